"""captioner serve: a real uvicorn server on 127.0.0.1 (random port) in front of a tiny captioner.

Batching tests hold the model call with a gate (a wrapper of the batcher's run function that counts calls and
can wait), so "requests that arrive together" is a fact of the test, not a race. Every loop is bounded."""

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
urllib3 = pytest.importorskip("urllib3")

from PIL import Image  # noqa: E402

from captioner.config import DecodeConfig  # noqa: E402
from captioner.serve.app import create_app, serving  # noqa: E402
from captioner.serve.settings import ServeConfig  # noqa: E402

SETTINGS = ServeConfig(port=0, max_batch_size=8, max_wait_ms=20, max_queue=8, max_files=4, max_body_mb=1,
                       max_pixels=100 * 100, request_timeout_s=30, max_num_beams_limit=4)
DECODE = DecodeConfig(strategy="greedy", max_new_tokens=6)
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]


def png(colour="red", size=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def post(url, files=(), fields=(), *, json_body=None, timeout=30, headers=None):
    """POST to /v1/caption: files [(name, bytes)] as `image` fields, fields [(key, value)]; -> (status, json)."""
    if json_body is not None:
        r = urllib3.request("POST", url + "/v1/caption", json=json_body, timeout=timeout)
    else:
        parts = [("image", (name, data, "application/octet-stream")) for name, data in files] + list(fields)
        r = urllib3.request("POST", url + "/v1/caption", fields=parts, timeout=timeout, headers=headers)
    return r.status, r.json(), r.headers


def get(url, path):
    return urllib3.request("GET", url + path, timeout=30)


def mean_captions(inputs, decode, prompt):
    """A stub model whose caption is a function of the item's own pixels (it never depends on neighbours)."""
    return [[f"mean {float(x['image'].mean()):.4f}"] for x in inputs]


class Gate:
    """Wraps the batcher's run function: records each model call's size and holds calls while closed."""

    def __init__(self, app, run=None):
        self.batcher = app.state.batcher
        self.inner = run or self.batcher.run_batch
        self.calls: list[int] = []
        self.open = threading.Event()  # set: calls pass; clear: each call waits for a permit
        self.open.set()
        self.permits = threading.Semaphore(0)

    def __call__(self, inputs, decode, prompt):
        self.calls.append(len(inputs))
        deadline = time.monotonic() + 30
        while not (self.open.is_set() or self.permits.acquire(timeout=0.01)):
            assert time.monotonic() < deadline, "gate never opened"
        return self.inner(inputs, decode, prompt)


@contextmanager
def gated(app, run=None):
    gate = Gate(app, run)
    previous, app.state.batcher.run_batch = app.state.batcher.run_batch, gate
    try:
        yield gate
    finally:
        gate.open.set()
        app.state.batcher.run_batch = previous


def wait_until(test, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not test():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def counter(url, name) -> float:
    """A metric's value from /metrics (0 when not there yet)."""
    for line in get(url, "/metrics").data.decode().split("\n"):
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def in_thread(fn, *args, **kwargs):
    """fn(*args) in a thread; out["r"] is its result, or (None, {"error": ...}, {}) if it raised."""
    out = {}

    def run():
        try:
            out["r"] = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (reported by the test's assertion on the status)
            out["r"] = (None, {"error": repr(e)}, {})
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    import torch

    from captioner.api import Captioner
    from captioner.demo.tiny import tiny_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("served") / "model"
    Captioner.from_config(tiny_config(tokenizer), tokenizer=tokenizer, device="cpu").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    from captioner.api import Captioner

    app = create_app(Captioner.from_pretrained(model_dir, device="cpu"), SETTINGS, DECODE)
    with serving(app, SETTINGS) as url:
        yield app, url


def test_captions_equal_captioner_caption(server, model_dir, tmp_path, capfd):
    from captioner.cli import main

    _, url = server
    (tmp_path / "a.png").write_bytes(png("red"))
    options = {"strategy": "sample", "seed": "3", "num_captions": "2", "top_p": "0.95", "max_new_tokens": "6"}
    status, body, _ = post(url, [("a.png", png("red"))], list(options.items()))
    assert status == 200, body
    assert main(["caption", str(tmp_path / "a.png"), "--model", str(model_dir), "--device", "cpu", "-o",
                 str(tmp_path / "out.jsonl"), *[a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", v)]]) == 0
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert body["results"][0]["captions"] == row["captions"] and len(row["captions"]) == 2
    # the server's default options are its --strategy/--max-new-tokens flags: greedy here, as caption's
    status, body, _ = post(url, [("a.png", png("red"))])
    assert main(["caption", str(tmp_path / "a.png"), "--model", str(model_dir), "--device", "cpu",
                 "--strategy", "greedy", "--max-new-tokens", "6"]) == 0
    assert capfd.readouterr().out.rstrip("\n").split("\t")[1] == body["results"][0]["caption"]


def test_prompt_option_is_the_models_prompt_for_that_request_only(server, tokenizer, monkeypatch):
    import torch

    from captioner.api import Captioner
    from captioner.demo.tiny import tiny_config

    app, url = server
    served = app.state.model["captioner"]
    seen = []  # the prompt ids in effect at each decoding call
    inner = served.caption_features
    monkeypatch.setattr(served, "caption_features", lambda *a, **k: seen.append(
        served.model.prompt_ids.tolist()) or inner(*a, **k))
    torch.manual_seed(0)  # the served model's weights (the prompt adds none), with a prompt in its config
    prompted = Captioner.from_config(tiny_config(tokenizer, prompt="a blue"), tokenizer=tokenizer, device="cpu")
    options = [("strategy", "sample"), ("seed", "1"), ("max_new_tokens", "6")]
    status, body, _ = post(url, [("a.png", png())], [*options, ("prompt", "a blue")])
    assert status == 200
    assert body["results"][0]["caption"] == prompted.caption(png(), decode=DecodeConfig(
        strategy="sample", seed=1, max_new_tokens=6))
    assert post(url, [("a.png", png())], options)[0] == 200
    assert seen == [prompted.model.prompt_ids.tolist(), []] and seen[0]  # restored after its request
    assert post(url, [("a.png", png())], [("prompt", "x" * 300)])[1]["kind"] == "options"


def test_requests_arriving_together_share_one_model_call_each_with_its_own_captions(server):
    app, url = server
    expected = {c: mean_captions([{"image": app.state.model["reader"].image(png(c), "x")}], None, None)[0][0]
                for c in COLOURS[:4]}
    assert len(set(expected.values())) == 4  # the stub's captions differ per image
    with gated(app, mean_captions) as gate:
        gate.open.clear()
        first, first_out = in_thread(post, url, [("first.png", png("red"))])
        wait_until(lambda: gate.calls == [1], "the first request to reach the model")
        threads = [in_thread(post, url, [(f"{c}.png", png(c))] * (2 if c == "green" else 1)) for c in COLOURS[1:4]]
        wait_until(lambda: app.state.batcher.waiting == 4, "three requests (four images) queued")
        gate.open.set()
        for t, _ in [(first, first_out), *threads]:
            t.join(30)
    assert gate.calls == [1, 4]  # the three waiting requests: one model call
    for c, (_, out) in zip(COLOURS[1:4], threads):
        status, body, _ = out["r"]
        assert status == 200 and [r["caption"] for r in body["results"]] == [expected[c]] * (2 if c == "green" else 1)
    assert first_out["r"][1]["results"][0]["caption"] == expected["red"]
    metrics = get(url, "/metrics").data.decode()
    assert re.search(r"^captioner_batch_size_bucket\{le=\"4\.0\"\} \d", metrics, re.M)


def test_a_request_the_model_fails_on_does_not_fail_its_batch(server):
    app, url = server
    poison = mean_captions([{"image": app.state.model["reader"].image(png("black"), "x")}], None, None)[0][0]

    def fragile(inputs, decode, prompt):  # a model that fails on one kind of input
        out = mean_captions(inputs, decode, prompt)
        if [poison] in out:
            raise RuntimeError("the model failed\non this input")
        return out

    with gated(app, fragile) as gate:
        gate.open.clear()
        first = in_thread(post, url, [("0.png", png())])
        wait_until(lambda: gate.calls == [1], "the first request to reach the model")
        bad, good = in_thread(post, url, [("black.png", png("black"))]), in_thread(post, url, [("w.png", png("white"))])
        wait_until(lambda: app.state.batcher.waiting == 2, "two requests to queue")
        gate.open.set()
        for t, _ in (first, bad, good):
            t.join(30)
    assert gate.calls == [1, 2, 1, 1]  # the failed batch of two, then each alone
    assert good[1]["r"][0] == 200 and good[1]["r"][1]["results"][0]["caption"].startswith("mean ")
    status, body, _ = bad[1]["r"]
    assert status == 500 and body == {"error": "internal error: the model failed on this input", "kind": "internal"}


def test_mixed_good_and_bad_uploads(server):
    app, url = server
    truncated = png("blue")[:-30]
    files = [("good.png", png("red")), ("text.png", b"hello, not an image"), ("cut.png", truncated),
             ("bomb.png", png("green", size=200))]
    with gated(app, mean_captions) as gate:
        status, body, _ = post(url, files)
    assert status == 200 and gate.calls == [1]  # only the readable image reaches the model
    good, text, cut, bomb = body["results"]
    assert good["caption"].startswith("mean ") and "error" not in good
    assert text["error"] == "text.png: not an image"
    assert cut["error"].startswith("cut.png: truncated")
    assert bomb["error"].startswith("bomb.png: too large (200 x 200 pixels > limit 10000")
    # a request with no readable input: 422, one line, and the server goes on
    status, body, _ = post(url, [("text.png", b"hello")])
    assert status == 422 and body["error"] == "text.png: not an image" and body["kind"] == "input"
    assert post(url, [("ok.png", png())])[0] == 200


def test_bad_requests_get_one_line_4xx_errors(server):
    _, url = server
    b64 = base64.b64encode(png()).decode()
    cases = [
        (400, "malformed", lambda: urllib3.request("POST", url + "/v1/caption", body=b"{nope",
                                                    headers={"Content-Type": "application/json"})),
        (400, "malformed", lambda: urllib3.request("POST", url + "/v1/caption", json={"images": ["%%%"]})),
        (422, "invalid_request", lambda: urllib3.request("POST", url + "/v1/caption",
                                                          json={"images": ["https://example.com/a.png"]})),
        (422, "options", lambda: urllib3.request("POST", url + "/v1/caption",
                                                  json={"images": [b64], "options": {"colour": 1}})),
        (422, "options", lambda: urllib3.request("POST", url + "/v1/caption",
                                                  json={"images": [b64], "options": {"num_beams": 99}})),
        (422, "options", lambda: urllib3.request("POST", url + "/v1/caption",
                                                  json={"images": [b64], "options": {"strategy": "best"}})),
        (422, "options", lambda: urllib3.request("POST", url + "/v1/caption", fields=[
            ("image", ("a.png", png(), "image/png")), ("top_p", "lots")])),
        (422, "options", lambda: urllib3.request("POST", url + "/v1/caption", fields=[
            ("image", ("a.png", png(), "image/png")), ("strategy", "greedy"), ("num_captions", "2")])),
        (413, "too_many_files", lambda: urllib3.request("POST", url + "/v1/caption", json={"images": [b64] * 5})),
        (413, "too_many_files", lambda: urllib3.request("POST", url + "/v1/caption", fields=[
            ("image", (f"{i}.png", png(), "image/png")) for i in range(5)])),
        (413, "body_too_large", lambda: urllib3.request("POST", url + "/v1/caption", fields=[
            ("image", ("big.bin", os.urandom(1024 * 1024 + 10), "image/png"))])),
        (413, "body_too_large", lambda: urllib3.PoolManager().request(  # no declared length: counted as read
            "POST", url + "/v1/caption", body=(b"x" * 65536 for _ in range(20)), chunked=True,
            headers={"Content-Type": "application/json"})),
        (415, "unsupported_media", lambda: urllib3.request("POST", url + "/v1/caption", body=png(),
                                                            headers={"Content-Type": "image/png"})),
        (422, "invalid_request", lambda: urllib3.request("POST", url + "/v1/caption", json={"images": []})),
        (422, "modality", lambda: urllib3.request("POST", url + "/v1/caption", json={"audio": [b64]})),
    ]
    before = counter(url, 'captioner_errors_total{kind="options"}')
    for status, kind, send in cases:
        r = send()
        body = r.json()
        assert (r.status, body["kind"]) == (status, kind), body
        assert body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"]
    assert post(url, [("ok.png", png())])[0] == 200
    assert counter(url, 'captioner_errors_total{kind="options"}') == before + 5


def test_queue_full_is_503_with_retry_after(server):
    app, url = server
    with gated(app, mean_captions) as gate:
        gate.open.clear()
        held = [in_thread(post, url, [("0.png", png())])]
        wait_until(lambda: gate.calls == [1], "the first request to reach the model")
        # a different option set: these wait behind the held batch and fill the queue (8 items)
        held += [in_thread(post, url, [(f"{i}.png", png())] * 4, [("max_new_tokens", "5")]) for i in range(2)]
        wait_until(lambda: app.state.batcher.waiting == 8, "the queue to fill")
        status, body, headers = post(url, [("late.png", png())])
        assert status == 503 and body["kind"] == "queue_full" and headers["Retry-After"] == "1"
        gate.open.set()
        for t, _ in held:
            t.join(30)
    assert [out["r"][0] for _, out in held] == [200, 200, 200]
    assert post(url, [("again.png", png())])[0] == 200


def raw_request(url, image: bytes) -> socket.socket:
    """A client that sends its request and reads nothing (the test closes it: the client goes away)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"images": [base64.b64encode(image).decode()]}).encode()
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return s


def test_client_going_away_does_not_break_its_batch(server):
    app, url = server
    batcher = app.state.batcher
    with gated(app, mean_captions) as gate:
        gate.open.clear()
        first = in_thread(post, url, [("0.png", png())])
        wait_until(lambda: gate.calls == [1], "the first request to reach the model")
        leaving = raw_request(url, png("blue"))
        wait_until(lambda: batcher.waiting == 1, "the raw request to queue")
        stays = in_thread(post, url, [("green.png", png("green"))])
        wait_until(lambda: batcher.waiting == 2, "a second request to queue")
        gate.permits.release()  # the first batch ends; the next one (both requests) starts and is held
        wait_until(lambda: gate.calls == [1, 2], "the batch of both requests to start")
        leaving.close()  # its client leaves while its batch runs
        time.sleep(0.2)
        gate.permits.release()
        for t, _ in (first, stays):
            t.join(30)
        # a client that leaves while queued: its request is dropped before any model call
        gate.open.clear()
        held = in_thread(post, url, [("0.png", png())])
        wait_until(lambda: gate.calls == [1, 2, 1], "a request to hold the model")
        raw_request(url, png("blue")).close()
        wait_until(lambda: batcher.pending and batcher.pending[0].abandoned, "the queued request to be abandoned")
        gate.open.set()
        held[0].join(30)
        wait_until(lambda: batcher.waiting == 0, "the abandoned request to leave the queue")
    assert gate.calls == [1, 2, 1]
    status, body, _ = stays[1]["r"]
    assert status == 200 and body["results"][0]["caption"] == mean_captions(
        [{"image": app.state.model["reader"].image(png("green"), "x")}], None, None)[0][0]
    assert get(url, "/healthz").status == 200 and post(url, [("ok.png", png())])[0] == 200
    assert counter(url, 'captioner_errors_total{kind="disconnected"}') == 2


def test_request_timeout_is_504_and_the_server_goes_on(model_dir):
    from captioner.api import Captioner

    settings = ServeConfig(port=0, max_wait_ms=0, request_timeout_s=0.3, max_queue=4, max_files=4)
    app = create_app(Captioner.from_pretrained(model_dir, device="cpu"), settings, DECODE)
    with serving(app, settings) as url, gated(app, mean_captions) as gate:
        gate.open.clear()
        status, body, _ = post(url, [("slow.png", png())])
        assert status == 504 and body["kind"] == "timeout"
        gate.open.set()
        assert post(url, [("ok.png", png())])[0] == 200
        assert 'captioner_errors_total{kind="timeout"} 1.0' in get(url, "/metrics").data.decode()
        app.state.begin_drain()  # what SIGTERM starts: not ready any more, requests in flight still answered
        wait_until(lambda: get(url, "/readyz").status == 503, "/readyz to say draining")
        assert get(url, "/readyz").json() == {"status": "draining"} and post(url, [("ok.png", png())])[0] == 200


def test_image_and_sound_pairs_and_sounds_alone(make_captioner):
    """A captioner of images and sounds: pairs in order, sounds alone, and a bad sound's own reason."""
    import numpy as np
    import soundfile as sf

    captioner = make_captioner(modalities=["image", "audio"], prefix_length=3, audio_prefix_length=2)

    def wav(freq):
        buf = io.BytesIO()
        sf.write(buf, np.sin(np.arange(16000) * freq / 16000 * 6.283).astype(np.float32) * 0.5, 16000, format="WAV")
        return buf.getvalue()

    settings = ServeConfig(port=0, max_files=4, max_queue=8)
    decode = DecodeConfig(strategy="sample", seed=0, max_new_tokens=5)
    with serving(create_app(captioner, settings, decode), settings) as url:
        pairs = [("image", ("a.png", png("red"), "image/png")), ("image", ("b.png", png("blue"), "image/png")),
                 ("audio", ("a.wav", wav(440), "audio/wav")), ("audio", ("b.wav", wav(880), "audio/wav"))]
        r = urllib3.request("POST", url + "/v1/caption", fields=pairs, timeout=60)
        alone = urllib3.request("POST", url + "/v1/caption", timeout=60, fields=[
            ("audio", ("c.wav", wav(220), "audio/wav")), ("audio", ("bad.wav", b"RIFF....WAVEjunk", "audio/wav"))])
    assert r.status == 200 and [x["caption"] for x in r.json()["results"]] == captioner.caption(
        [png("red"), png("blue")], audio=[wav(440), wav(880)], decode=decode)
    good, bad = alone.json()["results"]
    assert good["caption"] == captioner.caption(audio=wav(220), decode=decode)
    assert bad["error"].startswith("bad.wav: ") and "\n" not in bad["error"]


def test_health_metrics_docs_and_a_self_contained_page(server):
    _, url = server
    assert get(url, "/healthz").json() == {"status": "ok"}
    assert get(url, "/readyz").json() == {"status": "ready"}
    metrics = get(url, "/metrics").data.decode()
    for name in ("captioner_requests_total", "captioner_items_total", "captioner_batch_size_bucket",
                 "captioner_queue_depth", "captioner_request_latency_seconds_bucket", "captioner_errors_total"):
        assert name in metrics
    assert "/v1/caption" in get(url, "/openapi.json").json()["paths"] and get(url, "/docs").status == 200
    page = get(url, "/").data.decode()
    assert '<input id="files"' in page and 'for="files"' in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "@import" not in page


def test_serve_config_and_batch_keys():
    from captioner.errors import ConfigError
    from captioner.serve.batcher import batch_key

    with pytest.raises(ConfigError, match="max_files"):
        ServeConfig(max_files=10, max_queue=5)
    with pytest.raises(ConfigError, match="max_batch_size"):
        ServeConfig(max_batch_size=0)
    greedy = DecodeConfig(strategy="greedy")
    assert batch_key(greedy, None) == batch_key(DecodeConfig(strategy="greedy"), None) != batch_key(greedy, "A")
    seeded = DecodeConfig(strategy="sample", seed=1)
    assert batch_key(seeded, None) != batch_key(seeded, None)  # seeded draws are never merged


def test_cli_serve_drains_on_sigterm(model_dir):
    """A `captioner serve` process: requests queued when SIGTERM arrives are answered at once (they would
    otherwise wait 20 s for their batch to fill, past the 10 s drain limit), then it exits 0."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--model", str(model_dir), "--port", "0",
                             "--device", "cpu", "--max-wait-ms", "20000", "--drain-timeout-s", "10", "--strategy", "greedy",
                             "--max-new-tokens", "5"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving on" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, f"no 'serving on' line: {line!r}"
            line = proc.stderr.readline()
        url = re.search(r"http://[\d.]+:\d+", line).group(0)
        wait_until(lambda: get(url, "/readyz").status == 200, "the model to load", timeout=120)
        threads = [in_thread(post, url, [(f"{c}.png", png(c))]) for c in COLOURS[:3]]
        wait_until(lambda: "captioner_queue_depth 3.0" in get(url, "/metrics").data.decode(), "3 queued requests")
        proc.send_signal(signal.SIGTERM)
        for t, _ in threads:
            t.join(60)
        assert [out["r"][0] for _, out in threads] == [200, 200, 200]
        assert all(out["r"][1]["results"][0]["caption"] is not None for _, out in threads)
        assert proc.wait(60) == 0
        assert "drained" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_serve_refuses_rerank_in_one_line_before_loading(capfd, tmp_path):
    # The server keeps decoded tensors, not the images reranking scores against: before this check every
    # batch failed and every request got a 500.
    from captioner.cli import main

    code = main(["serve", "--model", str(tmp_path / "absent"), "--rerank", "clip"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "does not rerank" in err[0]


def test_cli_serve_unloadable_model_is_one_line(tmp_path, capfd):
    from captioner.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if "error" in line.lower()]
    assert errors[-1].startswith("captioner serve: error:") and "missing: not a directory" in errors[-1]
