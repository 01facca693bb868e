"""Benchmark of `captioner serve`: dynamic batching vs none (--max-batch-size 1), in one run.

For 1, 8, 32 and 128 concurrent clients (each a keep-alive connection sending one image per request, the
next as soon as the previous is answered), over loopback: throughput (images/s) and p50/p95/p99 latency.
Prints a table and one JSON line. Both servers are `captioner serve` subprocesses on 127.0.0.1 with the
same model and decoding options; each level runs for --seconds and counts the answers within it (requests
still waiting at the end are cut: their clients leave and the server drops them).

    python eval/bench_serve.py                      # trains the demo model first (about a minute)
    python eval/bench_serve.py --model demo_out/run/best --clients 1,8,32,128 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="captioner directory (default: train the demo model into --work-dir)")
    p.add_argument("--work-dir", default="bench_serve_out", help="where the demo model goes (default: bench_serve_out)")
    p.add_argument("--clients", default="1,8,32,128", help="concurrency levels (default: 1,8,32,128)")
    p.add_argument("--seconds", type=float, default=15.0, help="measured time per level (default: 15)")
    p.add_argument("--max-batch-size", type=int, default=32, help="the batching server's (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="the batching server's (default: 10)")
    p.add_argument("--strategy", default="greedy", help="decoding strategy (default: greedy)")
    p.add_argument("--num-beams", type=int, default=3, help="beams with --strategy beam (default: 3)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="(default: 20)")
    p.add_argument("--device", default="cpu", help="(default: cpu)")
    p.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS of the servers (default: torch's choice; 1 "
                   "helps on a machine whose cores other processes keep busy)")
    p.add_argument("--images", type=int, default=64, help="distinct test images (default: 64)")
    return p.parse_args(argv)


def demo_model(work_dir: Path) -> Path:
    best = work_dir / "run" / "best"
    if not (best / "config.json").exists():
        subprocess.run([sys.executable, "-m", "captioner", "demo", "--output-dir", str(work_dir)], check=True,
                       cwd=ROOT, timeout=1800)
    return best


def test_images(n: int) -> list[bytes]:
    """PNG images of the demo's kind (a coloured shape on a plain background), 64 x 64."""
    from captioner.demo.shapes import _draw, _split_attributes

    rng = np.random.default_rng(0)
    out = []
    for attrs in _split_attributes(n, rng):
        buf = io.BytesIO()
        _draw(attrs, 64, rng).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def multipart(image: bytes) -> tuple[bytes, str]:
    boundary = "benchboundary7MA4YWxk"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Server:
    """A `captioner serve` subprocess on 127.0.0.1 (any free port)."""

    def __init__(self, args, max_batch_size: int):
        cmd = [sys.executable, "-m", "captioner", "serve", "--model", str(args.model), "--port", "0",
               "--device", args.device, "--max-batch-size", str(max_batch_size), "--max-wait-ms",
               str(args.max_wait_ms), "--max-queue", "1024", "--strategy", args.strategy, "--num-beams",
               str(args.num_beams), "--max-new-tokens", str(args.max_new_tokens), "--request-timeout-s", "120"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if args.torch_threads:
            env["OMP_NUM_THREADS"] = str(args.torch_threads)
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        deadline, line = time.monotonic() + 300, ""
        while "serving on" not in line:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"the server did not start: {line!r}")
            line = self.proc.stderr.readline()
        host, port = re.search(r"http://([\d.]+):(\d+)", line).groups()
        self.host, self.port = host, int(port)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


async def request(reader, writer, host: str, body: bytes, kind: str) -> int:
    writer.write(f"POST /v1/caption HTTP/1.1\r\nHost: {host}\r\nContent-Type: {kind}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    await reader.readexactly(length)
    return status


async def wait_ready(server: Server, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await writer.drain()
            head = await reader.read(64)
            writer.close()
            if head.split(b" ")[1:2] == [b"200"]:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the server never became ready")


async def run_level(server: Server, clients: int, seconds: float, bodies: list[tuple[bytes, str]]) -> dict:
    """Closed-loop clients for `seconds`; requests still unanswered then are cut (their clients leave, so the
    server drops them from its queue): only answers within the window count."""
    latencies: list[float] = []
    errors = 0

    async def client(k: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(server.host, server.port)
        i = k
        try:
            while True:  # ended by the window's deadline (cancelled)
                body, kind = bodies[i % len(bodies)]
                t = time.monotonic()
                status = await request(reader, writer, server.host, body, kind)
                if status == 200:
                    latencies.append(time.monotonic() - t)
                else:
                    errors += 1
                i += clients
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(client(k)) for k in range(clients)]
    await asyncio.wait(tasks, timeout=seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    ms = np.array(latencies) * 1000
    await wait_idle(server)
    return {"clients": clients, "images": len(latencies), "errors": errors, "seconds": seconds,
            "images_per_s": round(len(latencies) / seconds, 2),
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) if len(ms) else None for q in (50, 95, 99)}}


async def wait_idle(server: Server, timeout: float = 300) -> None:
    """Until the server has finished the batch it was running when the level ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        text = (await reader.read()).decode()
        writer.close()
        if "captioner_requests_in_flight 0.0" in text and "captioner_queue_depth 0.0" in text:
            return
        await asyncio.sleep(0.2)


async def bench_server(args, max_batch_size: int, levels: list[int], bodies) -> list[dict]:
    server = Server(args, max_batch_size)
    try:
        await wait_ready(server)
        await run_level(server, 4, 3.0, bodies)  # warm-up: first calls allocate and pack weights
        return [await run_level(server, c, args.seconds, bodies) for c in levels]
    finally:
        server.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    args.model = Path(args.model) if args.model else demo_model(Path(args.work_dir))
    levels = [int(c) for c in args.clients.split(",")]
    bodies = [multipart(im) for im in test_images(args.images)]
    results = {}
    for mode, size in (("batching", args.max_batch_size), ("no batching", 1)):
        print(f"{mode} (--max-batch-size {size}) ...", file=sys.stderr, flush=True)
        results[mode] = asyncio.run(bench_server(args, size, levels, bodies))
    print(f"\ncaptioner serve, {args.model}, {args.strategy} (max {args.max_new_tokens} tokens), device "
          f"{args.device}, {os.cpu_count()} CPUs, loopback, {args.seconds:g} s per level, --max-wait-ms "
          f"{args.max_wait_ms:g}, torch threads {args.torch_threads or 'default'}")
    print(f"{'clients':>8} {'mode':<12} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}")
    summary = []
    for i, clients in enumerate(levels):
        b, n = results["batching"][i], results["no batching"][i]
        for mode, r in (("batching", b), ("no batching", n)):
            print(f"{clients:>8} {mode:<12} {r['images_per_s']:>9.1f} {r['p50_ms']:>8} {r['p95_ms']:>8} "
                  f"{r['p99_ms']:>8} {r['errors']:>7}")
        speedup = b["images_per_s"] / n["images_per_s"] if n["images_per_s"] else None
        summary.append({"clients": clients, "speedup": round(speedup, 2) if speedup else None,
                        "p95_no_worse": b["p95_ms"] is not None and n["p95_ms"] is not None and b["p95_ms"] <= n["p95_ms"]})
        print(f"{'':>8} {'speedup':<12} {speedup:>9.2f}x" if speedup else "")
    target = next((s for s in summary if s["clients"] == 32), None)
    print(json.dumps({"model": str(args.model), "torch_threads": args.torch_threads, "strategy": args.strategy, "max_new_tokens": args.max_new_tokens,
                      "seconds": args.seconds, "results": results, "summary": summary,
                      "target_32_clients_3x_p95_no_worse": bool(target and target["speedup"] and
                                                                target["speedup"] >= 3 and target["p95_no_worse"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
