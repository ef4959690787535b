"""Load on `llmlab serve` over loopback: concurrency, throughput against one request at a time,
time to first token and inter-token latency, and memory over a soak.

A random-weight 13.8M LLaMA (dim 384, 6 layers; the decode benchmark's 14M config with this
tokenizer's vocabulary) and a BPE tokenizer trained on the embedded corpus are served by a real
`llmlab serve` subprocess (fp32, CPU). Clients stream `/v1/completions` with SSE, each asking for
64 tokens with sampling, and time every token:

1. 32 concurrent streaming clients, 2 requests each: errors (HTTP or in-stream) and incomplete
   streams are counted; every request must complete.
2. Throughput in generated tokens/s: 8 requests one at a time, then 16 concurrent clients.
3. A soak: 16 clients for `--soak` seconds while the server's resident memory is sampled.

    python benchmarks/serve_load.py
    python benchmarks/serve_load.py --soak 30 --port 8123

Targets: zero errors with 32 clients; 16 concurrent clients >= 6x the one-at-a-time throughput;
memory flat over a 2-minute soak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import httpx
except ImportError:  # openai 3 ships its HTTP client as httpx2
    import httpx2 as httpx

MODEL = dict(dim=384, n_layers=6, n_heads=6, max_seq_len=512)
PROMPTS = ["The for statement", "A class definition", "Exceptions are", "The import system", "Lists are",
           "A function definition", "The with statement", "Dictionaries map"]


def build_checkpoint(folder: Path) -> Path:
    import torch

    from llmlab.data.ingest import default_corpus
    from llmlab.models import LlamaConfig, build_model
    from llmlab.models.io import save_model
    from llmlab.tokenizer import train_bpe

    tok = train_bpe((d.text for d in default_corpus()), 4096)
    torch.manual_seed(0)
    save_model(build_model(LlamaConfig(vocab_size=tok.vocab_size, **MODEL)), folder)
    tok.save(folder)
    return folder


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_request(client, url: str, prompt: str, stats: dict, max_tokens: int = 64) -> int:
    """Stream one completion; record TTFT and gaps between tokens; returns the tokens received."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last, chunks, usage, finished = None, 0, None, False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                stats["errors"].append(f"HTTP {r.status_code}")
                return 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    finished = True
                    break
                payload = json.loads(data)
                if "error" in payload:
                    stats["errors"].append(payload["error"]["message"])
                    return 0
                if payload.get("usage"):
                    usage = payload["usage"]
                if payload["choices"]:
                    now = time.perf_counter()
                    if last is None:
                        stats["ttft"].append(now - t0)
                    else:
                        stats["itl"].append(now - last)
                    last = now
                    chunks += 1
    except httpx.HTTPError as e:
        stats["errors"].append(f"{type(e).__name__}: {e}")
        return 0
    if not finished:
        stats["incomplete"] += 1
    return usage["completion_tokens"] if usage else 0


async def clients(url: str, n_clients: int, requests_each: int, stats: dict, until: float | None = None) -> int:
    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(i: int) -> int:
            total, k = 0, 0
            while (until is None and k < requests_each) or (until is not None and time.perf_counter() < until):
                total += await one_request(client, url, PROMPTS[(i + k) % len(PROMPTS)], stats)
                k += 1
            return total
        return sum(await asyncio.gather(*(worker(i) for i in range(n_clients))))


def new_stats() -> dict:
    return {"ttft": [], "itl": [], "errors": [], "incomplete": 0}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--soak", type=float, default=120.0, help="soak seconds (0 skips it)")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp) / "model")
        server = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", str(ckpt), "--port", str(args.port),
                                   "--max-batch", "32", "--max-queue", "256"], env={**os.environ, "NO_COLOR": "1"})
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            else:
                sys.exit("the server did not start")
            asyncio.run(clients(url, 2, 1, new_stats()))  # warm-up

            stats = new_stats()
            t0 = time.perf_counter()
            tokens = asyncio.run(clients(url, 32, 2, stats))
            dt = time.perf_counter() - t0
            print(f"32 concurrent streaming clients x 2 requests: {len(stats['errors'])} errors, "
                  f"{stats['incomplete']} incomplete, {tokens} tokens in {dt:.1f} s ({tokens / dt:.0f} tokens/s)")
            print(f"  time to first token p50/p90/p99: {pct(stats['ttft'], 50):.0f} / {pct(stats['ttft'], 90):.0f} / "
                  f"{pct(stats['ttft'], 99):.0f} ms; inter-token latency p50/p90/p99: {pct(stats['itl'], 50):.1f} / "
                  f"{pct(stats['itl'], 90):.1f} / {pct(stats['itl'], 99):.1f} ms")
            if stats["errors"]:
                print("  first errors:", stats["errors"][:3])

            single = new_stats()
            t0 = time.perf_counter()
            one = asyncio.run(clients(url, 1, 8, single)) / (time.perf_counter() - t0)
            many = new_stats()
            t0 = time.perf_counter()
            sixteen = asyncio.run(clients(url, 16, 2, many)) / (time.perf_counter() - t0)
            ratio = sixteen / one
            print(f"throughput: one at a time {one:.0f} tokens/s; 16 concurrent {sixteen:.0f} tokens/s: {ratio:.1f}x "
                  f"(target >= 6x: {'met' if ratio >= 6 else 'NOT MET'})")

            if args.soak > 0:
                samples = []
                soak = new_stats()

                async def soak_run():
                    until = time.perf_counter() + args.soak
                    task = asyncio.create_task(clients(url, 16, 0, soak, until))
                    while not task.done():
                        samples.append((time.perf_counter(), rss_mib(server.pid)))
                        await asyncio.sleep(2)
                    return await task

                tokens = asyncio.run(soak_run())
                steady = samples[len(samples) // 10:]  # after the first tenth: buffers and caches have grown
                third = max(1, len(steady) // 3)
                early = statistics.median(r for _, r in steady[:third])
                late = statistics.median(r for _, r in steady[-third:])
                print(f"soak {args.soak:.0f} s, 16 clients: {tokens} tokens, {len(soak['errors'])} errors; server RSS "
                      f"median {early:.0f} MiB in the first third, {late:.0f} MiB in the last ({late - early:+.0f} MiB), "
                      f"peak {max(r for _, r in samples):.0f} MiB")
                marks = samples[::max(1, len(samples) // 8)]
                print("  RSS over time: " + ", ".join(f"{t - samples[0][0]:.0f}s {r:.0f}" for t, r in marks))
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
