"""Image + audio fusion: prefix layout, absent modalities, mixed batches, modality dropout, modality
errors, save/load with a tiny CLAP audio encoder."""

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from captioner.api import Captioner
from captioner.config import ConfigError, DecodeConfig, ModelConfig
from captioner.model.model import ModalityError
from captioner.train.loop import drop_modalities

GREEDY = DecodeConfig(strategy="greedy", max_new_tokens=6)


@pytest.fixture
def both(make_captioner):
    return make_captioner(modalities=["image", "audio"], prefix_length=3, audio_prefix_length=2,
                          prompt="a")


@pytest.fixture
def files(tmp_path):
    t = np.arange(32000) / 16000
    paths = []
    for i, freq in enumerate((300, 2000)):
        a, im = tmp_path / f"{i}.wav", tmp_path / f"{i}.png"
        sf.write(a, (0.5 * np.sin(2 * np.pi * freq * t)).astype("float32"), 16000)
        Image.new("RGB", (64, 64), (200 * i, 50, 100)).save(im)
        paths.append((str(im), str(a)))
    return paths


def feats(cap, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, e.output_dim, generator=g) for m, e in cap.model.encoders.items()}


def test_config_records_modalities_in_prefix_order():
    assert ModelConfig(modalities=["audio", "image"]).modalities == ["image", "audio"]
    for bad in ([], ["video"], ["image", "image"]):
        with pytest.raises(ConfigError, match="modalities"):
            ModelConfig(modalities=bad)


def test_prefix_layout_and_missing_modality_is_absent(both):
    m, f = both.model, feats(both)
    width = m.lm.get_input_embeddings().embedding_dim
    full, mask = m.prefix_embeds(f)
    assert full.shape == (3, 3 + 2 + 1, width) and mask is None  # [image 3][audio 2][prompt 1]
    img, _ = m.prefix_embeds({"image": f["image"]})
    aud, _ = m.prefix_embeds({"audio": f["audio"]})
    assert img.shape[1] == 4 and aud.shape[1] == 3  # absent, not zero-filled
    # the image segment carries the image modality embedding, the audio one its own
    mapped = m.mappers["image"](f["image"])
    assert torch.allclose(full[:, :3], mapped + m.modality_embed[0])
    assert torch.allclose(img[:, :3], full[:, :3]) and torch.allclose(aud[:, :2], full[:, 3:5])
    assert not torch.allclose(m.modality_embed[0], m.modality_embed[1])


def test_mixed_batch_rows_equal_rows_alone(both):
    m, f = both.model.eval(), feats(both)
    ids = torch.randint(1, 50, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[2, 3:] = 0
    present = {"image": torch.tensor([True, True, False]), "audio": torch.tensor([True, False, True])}
    out = m(f, ids, mask, present)
    first = {k: x[:1] for k, x in f.items()}
    alone = [m(first, ids[:1], mask[:1]).logits, m({"image": f["image"][1:2]}, ids[1:2], mask[1:2]).logits,
             m({"audio": f["audio"][2:]}, ids[2:], mask[2:]).logits]
    for i, logits in enumerate(alone):
        n = int(mask[i].sum())
        assert torch.allclose(out.logits[i, -5:-5 + n], logits[0, -5:-5 + n], atol=1e-5), i
    # and the batch loss equals the token-weighted loss of the rows alone
    losses = [m(*args).loss * int(mk.sum()) for args, mk in (
        ((first, ids[:1], mask[:1]), mask[0]), (({"image": f["image"][1:2]}, ids[1:2], mask[1:2]), mask[1]),
        (({"audio": f["audio"][2:]}, ids[2:], mask[2:]), mask[2]))]
    assert torch.allclose(out.loss, sum(losses) / mask.sum(), atol=1e-5)


def test_caption_rows_do_not_depend_on_neighbours(both):
    f = feats(both, n=4)
    present = {"image": torch.tensor([True, False, True, True]), "audio": torch.tensor([True, True, False, True])}
    together = both.caption_rows(f, present, GREEDY)
    assert together[0] == both.caption_features({m: x[:1] for m, x in f.items()}, GREEDY)[0]
    assert together[1] == both.caption_features({"audio": f["audio"][1:2]}, GREEDY)[0]
    assert together[2] == both.caption_features({"image": f["image"][2:3]}, GREEDY)[0]


def test_modality_dropout_never_removes_the_last_input():
    present = {"image": torch.tensor([True] * 1000 + [True, False]), "audio": torch.tensor([True] * 1000 + [False, True])}
    out = drop_modalities(present, 0.4, torch.Generator().manual_seed(0))
    held = torch.stack([out["image"], out["audio"]], 1)
    assert bool((held.sum(1) >= 1).all())
    assert out["image"][-2] and out["audio"][-1]  # single-input rows untouched
    dropped = (held[:1000].sum(1) == 1)
    assert 0.35 < dropped.float().mean() < 0.45  # rate p
    lost_image = (~out["image"][:1000]).sum().item()
    assert 0.4 < lost_image / dropped.sum().item() < 0.6  # which input: even
    again = drop_modalities(present, 0.4, torch.Generator().manual_seed(0))
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert drop_modalities(present, 0.0, torch.Generator()) is present


def test_caption_api_image_audio_and_both(both, files):
    (im0, a0), (im1, a1) = files
    pair = both.caption([im0, im1], audio=[a0, a1], decode=GREEDY)
    assert len(pair) == 2 and all(isinstance(c, str) for c in pair)
    assert both.caption(im0, audio=a0, decode=GREEDY) == pair[0]
    assert isinstance(both.caption(audio=a1, decode=GREEDY), str)
    assert isinstance(both.caption(im1, decode=GREEDY), str)
    with pytest.raises(ValueError, match="counts must match"):
        both.caption([im0, im1], audio=[a0], decode=GREEDY)
    # iter_captions takes dicts with either or both inputs, and reports unreadable audio per item
    bad = files[0][1] + ".missing.wav"
    out = list(both.iter_captions([{"image": im0, "audio": a0}, {"audio": bad}, {"audio": a1}], decode=GREEDY))
    assert out[0][1] == [pair[0]] and out[1][2].startswith(bad) and "no such file" in out[1][2]
    assert out[2][1] == [both.caption(audio=a1, decode=GREEDY)]


def test_image_only_model_refuses_audio(make_captioner, files):
    cap = make_captioner()
    with pytest.raises(ModalityError, match="trained on image only.*cannot use audio.*modalities image,audio"):
        cap.caption(files[0][0], audio=files[0][1])
    with pytest.raises(ModalityError, match="audio"):
        cap.caption(audio=files[0][1])
    audio_only = make_captioner(modalities=["audio"])
    with pytest.raises(ModalityError, match="trained on audio only.*cannot use image"):
        audio_only.caption(files[0][0])
    assert "image" not in audio_only.model.encoders  # no image tower built for an audio-only model


def test_save_load_round_trip_with_audio(both, files, tmp_path):
    both.model.mappers["audio"].feature_norm.fit(torch.randn(10, both.model.encoders["audio"].output_dim))
    (im0, a0), _ = files
    before = [both.caption(im0, audio=a0, decode=GREEDY), both.caption(audio=a0, decode=GREEDY)]
    both.save_pretrained(tmp_path / "m")
    loaded = Captioner.from_pretrained(tmp_path / "m", device="cpu")
    assert loaded.config.modalities == ["image", "audio"]
    assert [loaded.caption(im0, audio=a0, decode=GREEDY), loaded.caption(audio=a0, decode=GREEDY)] == before
    ref = both.model.state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, ref[k]), k  # the random tiny CLAP tower was saved, not re-initialised


def test_whisper_audio_captioner_round_trip(make_captioner, files, tmp_path):
    from captioner.demo.tiny import tiny_whisper_config

    cap = make_captioner(modalities=["audio"], audio_encoder="whisper", audio_config=tiny_whisper_config(),
                         whisper_pool=2)
    enc = cap.model.encoders["audio"]
    assert enc.kind == "whisper" and enc.output_dim == 2 * 32  # two pooled time segments of d_model 32
    low, high = files[0][1], files[1][1]
    f = cap.encode_audio([low, high])
    assert f.shape == (2, 64) and not torch.allclose(f[0], f[1])
    before = cap.caption(audio=[low, high], decode=GREEDY)
    cap.save_pretrained(tmp_path / "w")
    loaded = Captioner.from_pretrained(tmp_path / "w", device="cpu")
    assert loaded.config.whisper_pool == 2 and loaded.caption(audio=[low, high], decode=GREEDY) == before


def test_iter_captions_with_workers_equals_in_process(both, files):
    (im0, a0), (im1, a1) = files
    items = [{"image": im0, "audio": a0}, {"audio": a1}, {"image": im1 + ".gone.png"}, im1, {"image": im1, "audio": a1}]
    serial = list(both.iter_captions(items, decode=GREEDY, batch_size=2, num_workers=0))
    workers = list(both.iter_captions(items, decode=GREEDY, batch_size=2, num_workers=2))
    assert serial == workers
    assert [it for it, _, _ in serial] == items  # input order, the original items
    assert serial[2][1] is None and "no such file" in serial[2][2]
    assert serial[3][1] == [both.caption(im1, decode=GREEDY)]


def test_bfloat16_captioner_runs_every_part_in_bfloat16(both, files, tmp_path):
    both.save_pretrained(tmp_path / "m")
    half = Captioner.from_pretrained(tmp_path / "m", device="cpu", dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    (im0, a0), _ = files
    out = list(half.iter_captions([{"image": im0, "audio": a0}, im0], decode=GREEDY))
    assert all(isinstance(c[0], str) and err is None for _, c, err in out)


def test_iter_captions_streams_instead_of_accumulating(both, files, monkeypatch):
    """Results come out batch by batch while later inputs are not yet read: memory does not grow with the
    number of inputs."""
    from captioner.inputs.loader import InputDataset

    loads = []
    original = InputDataset.__getitem__
    monkeypatch.setattr(InputDataset, "__getitem__", lambda self, i: loads.append(i) or original(self, i))
    items = [files[i % 2][0] for i in range(10)]
    stream = both.iter_captions(items, decode=GREEDY, batch_size=2, num_workers=0)  # reads counted in process
    first = next(stream)
    assert first[0] == items[0] and len(loads) == 2  # only the first batch was read
    rest = list(stream)
    assert len(rest) == 9 and loads == list(range(10))


def test_feature_statistics_stay_float32_in_a_bfloat16_model(make_captioner):
    cap = make_captioner()
    norm = cap.model.mappers["image"].feature_norm
    feats = 0.3 + 1e-4 * torch.randn(64, cap.model.image_encoder.output_dim)  # a random tower's features
    norm.fit(feats)
    z32 = norm(feats)
    cap.model.to(torch.bfloat16)
    assert norm.mean.dtype == torch.float32 and norm.std.dtype == torch.float32
    z16 = norm(feats)  # the features reach the mapper in float32 from the encoder
    torch.testing.assert_close(z16, z32)
    prefix, _ = cap.model.prefix_embeds(feats)
    assert prefix.dtype == torch.bfloat16 and torch.isfinite(prefix.float()).all()
