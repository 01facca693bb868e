"""captioner.inputs.audio: reading sound files (formats, scaling, mono, resampling, errors), fit_window, and the
frozen tiny CLAP / Whisper encoders (offline, random init)."""

import time

import numpy as np
import pytest
import soundfile as sf
import torch

from captioner import hub
from captioner.demo.tiny import tiny_clap_config, tiny_whisper_config
from captioner.inputs.audio import AudioError, fit_window, load_audio
from captioner.model.audio_encoder import build_audio_encoder
from captioner.model.encoders import ModelLoadError


def tone(freq, seconds, rate, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_freq(x, rate):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)]


@pytest.mark.parametrize("ext,subtype", [("wav", "PCM_16"), ("wav", "PCM_U8"), ("wav", "FLOAT"),
                                         ("flac", "PCM_16"), ("ogg", "VORBIS")])
def test_formats_load_as_float32_mono(tmp_path, ext, subtype):
    x = tone(440, 0.5, 16000)
    path = tmp_path / f"a_{subtype}.{ext}"
    sf.write(path, x, 16000, subtype=subtype)
    y = load_audio(path, sample_rate=16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - len(x)) <= (0 if ext != "ogg" else 64)
    n = min(len(x), len(y))
    tol = {"PCM_U8": 0.02, "VORBIS": 0.05}.get(subtype, 1e-3)
    assert np.abs(y[:n] - x[:n]).max() < tol
    assert dominant_freq(y, 16000) == pytest.approx(440, abs=4)


def test_mp3_if_supported(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile has no MP3 support")
    path = tmp_path / "a.mp3"
    sf.write(path, tone(440, 1.0, 16000), 16000, format="MP3", subtype="MPEG_LAYER_III")
    y = load_audio(path, sample_rate=16000)
    assert dominant_freq(y, 16000) == pytest.approx(440, abs=5)


def test_integer_pcm_scaling(tmp_path):
    full = np.round(32767 * np.sin(2 * np.pi * 100 * np.arange(16000) / 16000)).astype(np.int16)
    sf.write(tmp_path / "full.wav", full, 16000, subtype="PCM_16")
    y = load_audio(tmp_path / "full.wav", sample_rate=16000)
    assert 0.99 < np.abs(y).max() <= 1.0
    sf.write(tmp_path / "u8.wav", np.zeros(800, np.int16), 8000, subtype="PCM_U8")
    assert (tmp_path / "u8.wav").read_bytes()[-1] == 128  # unsigned 8-bit silence is stored as 128
    y = load_audio(tmp_path / "u8.wav", sample_rate=8000)
    assert len(y) == 800 and np.abs(y).max() == 0.0


def test_stereo_mixed_to_mono_by_averaging(tmp_path):
    x = tone(300, 0.5, 16000)
    sf.write(tmp_path / "cancel.wav", np.stack([x, -x], axis=1), 16000, subtype="FLOAT")
    y = load_audio(tmp_path / "cancel.wav", sample_rate=16000)
    assert y.shape == (8000,) and np.abs(y).max() < 1e-6
    sf.write(tmp_path / "half.wav", np.stack([x, np.zeros_like(x)], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "half.wav", sample_rate=16000), x / 2, atol=1e-6)


def test_resampling_keeps_frequency_and_length(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1000, 1.0, 44100), 44100, subtype="PCM_16")
    y = load_audio(tmp_path / "a.wav", sample_rate=16000)
    assert abs(len(y) - 16000) <= 1
    assert dominant_freq(y, 16000) == pytest.approx(1000, abs=2)
    assert 0.45 < np.abs(y[1000:-1000]).max() < 0.55  # amplitude kept


def test_silent_audio_is_fine(tmp_path):
    sf.write(tmp_path / "s.flac", np.zeros(4000, np.float32), 16000, subtype="PCM_16")
    y = load_audio(tmp_path / "s.flac", sample_rate=16000)
    assert y.shape == (4000,) and not y.any()


def test_fit_window():
    x = np.arange(10, dtype=np.float32) + 1
    short = fit_window(x, 15)
    assert short.shape == (15,) and (short[:10] == x).all() and not short[10:].any()
    assert (fit_window(x, 4) == x[3:7]).all()  # centred
    assert (fit_window(x, 4, policy="start") == x[:4]).all()
    exact = fit_window(x, 10)
    assert (exact == x).all() and exact is not x
    with pytest.raises(ValueError):
        fit_window(x, 4, policy="end")


def _assert_error(path, phrase, **kwargs):
    with pytest.raises(AudioError) as info:
        load_audio(path, sample_rate=16000, **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and phrase in msg and "\n" not in msg, msg
    return msg


def test_file_errors(tmp_path):
    _assert_error(tmp_path / "missing.wav", "no such file")
    _assert_error(tmp_path, "is a directory")
    (tmp_path / "empty.wav").write_bytes(b"")
    _assert_error(tmp_path / "empty.wav", "empty file")
    (tmp_path / "notes.wav").write_text("these are not sounds\n" * 20)
    _assert_error(tmp_path / "notes.wav", "not an audio file")
    (tmp_path / "a.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    _assert_error(tmp_path / "a.m4a", "unsupported format (MP4/M4A)")
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    _assert_error(tmp_path / "zero.wav", "no samples")
    sf.write(tmp_path / "big.wav", tone(440, 1.0, 16000), 16000)
    _assert_error(tmp_path / "big.wav", "too large", max_bytes=1000)
    _assert_error(tmp_path / "big.wav", "too long", max_seconds=0.5)
    assert len(load_audio(tmp_path / "big.wav", sample_rate=16000, max_seconds=1.5)) == 16000


@pytest.mark.parametrize("ext,subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS")])
def test_truncated_files(tmp_path, ext, subtype):
    good = tmp_path / f"good.{ext}"
    sf.write(good, tone(440, 1.0, 16000), 16000, subtype=subtype)
    data = good.read_bytes()
    for frac in (0.5, 0.9):
        cut = tmp_path / f"cut{frac}.{ext}"
        cut.write_bytes(data[:int(len(data) * frac)])
        msg = _assert_error(cut, "")
        assert "truncated" in msg or "corrupt audio data" in msg, msg
    if ext in ("wav", "ogg"):  # the WAV data chunk size / the Ogg end-of-stream page show the cut
        _assert_error(cut, "truncated")
    if ext == "ogg":  # cut exactly between pages: every page complete, but no end-of-stream page
        long = tmp_path / "long.ogg"
        sf.write(long, tone(440, 6.0, 16000), 16000, subtype=subtype)
        data = long.read_bytes()
        assert data.count(b"OggS") > 3  # audio pages before the last one
        boundary = tmp_path / "pages.ogg"
        boundary.write_bytes(data[:data.rfind(b"OggS")])
        _assert_error(boundary, "truncated")


def test_corrupt_files(tmp_path):
    sf.write(tmp_path / "good.flac", tone(440, 1.0, 16000), 16000, subtype="PCM_16")
    data = bytearray((tmp_path / "good.flac").read_bytes())
    for i in range(200, len(data) // 2):
        data[i] = (data[i] * 7 + 13) % 256
    (tmp_path / "bad.flac").write_bytes(bytes(data))
    _assert_error(tmp_path / "bad.flac", "corrupt audio data")
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(40)))
    msg = _assert_error(tmp_path / "bad.wav", "")
    assert "corrupt audio data" in msg or "truncated" in msg, msg


# ----------------------------------------------------------------------------------------------- encoders


@pytest.fixture(scope="module", params=["clap", "whisper"])
def tiny_encoder(request):
    torch.manual_seed(0)
    config = tiny_clap_config() if request.param == "clap" else tiny_whisper_config()
    start = time.perf_counter()
    enc = build_audio_encoder(request.param, None, config=config)
    enc.build_seconds = time.perf_counter() - start
    return enc


def test_tiny_encoder_builds_frozen(tiny_encoder):
    assert tiny_encoder.build_seconds < 10  # includes the first transformers import
    assert tiny_encoder.sample_rate == 16000 and tiny_encoder.window_seconds == 2.0
    assert not any(p.requires_grad for p in tiny_encoder.parameters())
    tiny_encoder.train()
    assert not tiny_encoder.training and not any(m.training for m in tiny_encoder.modules())


def test_tiny_encoder_features(tiny_encoder):
    sr = tiny_encoder.sample_rate
    clips = [tone(440, 0.7, sr), tone(3000, 3.5, sr), tone(440, 2.0, sr)]  # shorter, longer, exact window
    batch = tiny_encoder.preprocess(clips)
    feats = tiny_encoder(batch)
    assert feats.shape == (3, tiny_encoder.output_dim) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and not feats.requires_grad
    assert not torch.allclose(feats[0], feats[1], atol=1e-4)  # different tones, different features
    single = tiny_encoder(tiny_encoder.preprocess(clips[1]))
    torch.testing.assert_close(single[0], feats[1], atol=1e-4, rtol=1e-4)  # deterministic, batch-independent


def test_tiny_encoder_output_dim_read_from_model(tiny_encoder):
    start = time.perf_counter()
    clap = build_audio_encoder("clap", None, config={**tiny_clap_config(), "projection_dim": 24})
    assert time.perf_counter() - start < 2  # transformers already imported by the fixture
    assert clap.output_dim == 24
    cfg = {**tiny_whisper_config(), "whisper_pool": 3}
    whisper = build_audio_encoder("whisper", None, config=cfg)
    assert whisper.output_dim == 3 * 32
    sr = whisper.sample_rate
    assert whisper(whisper.preprocess([tone(440, 1.0, sr), tone(880, 0.3, sr)])).shape == (2, 96)


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        build_audio_encoder("clap", "nobody-here/clap-that-does-not-exist")
    assert time.perf_counter() - start < 10
    msg = str(info.value)
    assert "nobody-here/clap-that-does-not-exist" in msg and "unreachable" in msg and "local path" in msg
