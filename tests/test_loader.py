"""The one input loader: every kind of item, caption() == iter_captions() (captions and errors), sharded
captioning of image + audio pairs."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from captioner.config import DecodeConfig
from captioner.errors import InputError
from captioner.inputs.loader import InputDataset

GREEDY = DecodeConfig(strategy="greedy", max_new_tokens=6)


def _picture(i, size=(48, 40)):
    im = Image.new("RGB", size, (40 + 60 * i, 200 - 50 * i, 90))
    im.paste((255, 255, 255), (4 * i, 5, 4 * i + 12, 20))
    return im


def _tone(freq, seconds=1.0, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype("float32")


@pytest.fixture
def mixed(tmp_path):
    """A good PNG, a good JPEG, a corrupt file and a missing file."""
    png, jpg, bad = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.jpg"
    _picture(0).save(png)
    _picture(1).save(jpg, quality=90)
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    return [str(png), str(jpg), str(bad), str(tmp_path / "gone.png")]


def test_caption_and_iter_captions_agree_on_captions_and_errors(make_captioner, mixed):
    cap = make_captioner(seed=2)
    streamed = list(cap.iter_captions(mixed, decode=GREEDY, batch_size=3))
    assert [it for it, _, _ in streamed] == mixed
    errors = [err for _, _, err in streamed]
    assert errors[:2] == [None, None] and all(errors[2:])
    assert "gone.png: no such file" in errors[3]
    good = [c[0] for _, c, err in streamed if err is None]
    assert cap.caption(mixed[:2], decode=GREEDY, batch_size=3) == good
    assert [cap.caption(p, decode=GREEDY) for p in mixed[:2]] == good
    for path, error in zip(mixed[2:], errors[2:]):
        with pytest.raises(InputError) as raised:
            cap.caption(path, decode=GREEDY)
        assert str(raised.value) == error
    with pytest.raises(InputError) as raised:  # a batch stops at its first bad input, with its message
        cap.caption(mixed, decode=GREEDY)
    assert str(raised.value) == errors[2]


def test_every_kind_of_image_item_gives_the_same_caption(make_captioner, tmp_path):
    cap = make_captioner(seed=1)
    image = _picture(2)
    path = tmp_path / "x.png"
    image.save(path)
    as_path = cap.caption(str(path), decode=GREEDY)
    assert cap.caption(path.read_bytes(), decode=GREEDY) == as_path
    assert cap.caption(image, decode=GREEDY) == as_path
    assert cap.caption(np.asarray(image), decode=GREEDY) == as_path
    assert cap.caption([path, image], decode=GREEDY) == [as_path, as_path]
    streamed = list(cap.iter_captions([b"", {"image": 3}], decode=GREEDY))
    assert "item 0: empty file" in streamed[0][2] and "item 1: not an image" in streamed[1][2]


def test_every_kind_of_sound_item_gives_the_same_features(make_captioner, tmp_path):
    cap = make_captioner(modalities=["audio"], audio_prefix_length=2)
    tone = _tone(700)
    path = tmp_path / "t.wav"
    sf.write(path, tone, 16000, subtype="FLOAT")  # lossless: the array is what the file holds
    from_file = cap.encode_audio([str(path)])
    assert np.allclose(cap.encode_audio([path.read_bytes()]), from_file)
    assert np.allclose(cap.encode_audio([tone]), from_file, atol=1e-5)
    path.write_bytes(path.read_bytes()[:2000])
    ((_, _, error),) = cap.iter_captions([{"audio": str(path)}], decode=GREEDY)
    assert error.startswith(f"{path}: truncated")


def test_dataset_is_picklable_for_workers(make_captioner, mixed):
    cap = make_captioner()
    dataset = InputDataset(mixed, cap.input_reader(jpegs=True))
    copy = pickle.loads(pickle.dumps(dataset))
    key, inputs, error = copy[1]
    assert key == 1 and error is None and type(inputs["image"]).__name__ == "JpegBytes"
    key, inputs, error = copy[3]
    assert inputs is None and isinstance(error, InputError)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _encoded(obj, fmt):
    buf = io.BytesIO()
    if fmt == "WAV":
        sf.write(buf, obj, 16000, format="WAV")
    else:
        obj.save(buf, format=fmt)
    return buf.getvalue()


def test_sharded_captioning_of_image_audio_pairs(make_captioner, tmp_path, monkeypatch):
    """A WebDataset tar of image + sound pairs, a sound alone, an image alone and a damaged sound, captioned
    by a two-input captioner through `captioner caption --output-dir`: every row equals iter_captions'."""
    from captioner.cli import main

    cap = make_captioner(modalities=["image", "audio"], prefix_length=3, audio_prefix_length=2, prompt="a")
    cap.save_pretrained(tmp_path / "model")
    samples = {
        "p0": {"png": _encoded(_picture(0), "PNG"), "wav": _encoded(_tone(300), "WAV")},
        "p1": {"png": _encoded(_picture(1), "PNG"), "wav": _encoded(_tone(2000), "WAV")},
        "s2": {"wav": _encoded(_tone(900), "WAV")},
        "i3": {"png": _encoded(_picture(3), "PNG")},
        "bad": {"png": _encoded(_picture(2), "PNG"), "wav": b"RIFF\x00\x00 nothing"},
    }
    with tarfile.open(tmp_path / "pairs.tar", "w") as tar:
        for key, members in samples.items():
            for suffix, data in members.items():
                _add(tar, f"{key}.{suffix}", data)
    from captioner.model.audio_encoder import AudioEncoder

    sounds = []
    forward = AudioEncoder.forward
    monkeypatch.setattr(AudioEncoder, "forward", lambda self, b: sounds.append(len(b["num_samples"])) or forward(self, b))
    out = tmp_path / "out"
    rc = main(["caption", str(tmp_path / "pairs.tar"), "--model", str(tmp_path / "model"), "--output-dir", str(out),
               "--strategy", "greedy", "--max-new-tokens", "6", "--batch-size", "2", "--num-workers", "1"])
    assert rc == 1  # one input failed
    assert sum(sounds) == 3  # p0, p1 and s2 were heard
    rows = {r["key"]: r["caption"] for r in map(json.loads, (out / "captions.jsonl").read_text().splitlines())}
    errors = [json.loads(x) for x in (out / "shards" / "pairs.errors.jsonl").read_text().splitlines()]
    assert [e["key"] for e in errors] == ["bad"] and f"{tmp_path / 'pairs.tar'}:bad.wav: " in errors[0]["error"]
    items = [{m: samples[k][s] for m, s in (("image", "png"), ("audio", "wav")) if s in samples[k]}
             for k in ("p0", "p1", "s2", "i3")]
    expected = [c[0] for _, c, _ in cap.iter_captions(items, decode=GREEDY)]
    assert [rows[k] for k in ("p0", "p1", "s2", "i3")] == expected


def test_worker_count_defaults_from_the_cpus_this_process_may_use(make_captioner, mixed, monkeypatch):
    import os

    from captioner.inputs import loader

    for cpus, workers in ((1, 0), (2, 1), (3, 2), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert loader.default_workers() == workers
    asked = []
    real = loader.DataLoader
    monkeypatch.setattr(loader, "DataLoader", lambda *a, **kw: asked.append(kw["num_workers"]) or real(*a, **kw))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    cap = make_captioner()
    list(cap.iter_captions(mixed[:1], decode=DecodeConfig(strategy="greedy", max_new_tokens=2)))
    list(cap.iter_captions(mixed[:1], decode=DecodeConfig(strategy="greedy", max_new_tokens=2),
                           num_workers=1))
    assert asked == [0, 1]  # the default from one CPU: read in-process; an explicit value stays


@pytest.mark.parametrize("workers", [0, 1])
def test_reading_inputs_leaves_the_global_rng_alone(workers):
    """Training initialises its mappers and orders its data from the global RNG after encoding features:
    reading inputs must not draw from it (a DataLoader draws its workers' base seed from its generator)."""
    import torch

    from captioner.inputs.loader import load_batches

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    rows = [row for batch in load_batches(list(range(5)), batch_size=2, num_workers=workers) for row in batch]
    assert rows == list(range(5))
    torch.testing.assert_close(torch.rand(3), expected)
