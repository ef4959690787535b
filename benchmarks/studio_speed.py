"""The studio's two speed targets: a page with 50 runs renders in under 300 ms, and a metrics line
reaches the browser within 2 s of being written.

A workspace of `--runs` finished runs (config.yaml and a metrics.jsonl of `--steps` lines each, as
pretrain writes them, indexed by the registry) and one running run is served by a real `llmlab
studio` process on loopback. Then:

1. The runs page, fetched `--repeat` times by a logged-in client after one warm-up: min, median
   and max wall time of the whole request (the server renders from the registry on each request).
2. The running run's page and its event stream: `--lines` metrics lines are appended to its
   metrics.jsonl, one every 0.5 s, each carrying the time it was written; the time until the line
   arrives on the stream is measured (min, median, max).

    python benchmarks/studio_speed.py
    python benchmarks/studio_speed.py --runs 200 --steps 20000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

try:
    import httpx
except ImportError:  # openai 3 ships its HTTP client as httpx2
    import httpx2 as httpx

from llmlab.studio.store import Store
from llmlab.track import Registry

PASSWORD = "bench-password"


def make_workspace(root: Path, runs: int, steps: int) -> Path:
    store = Store.open(root, create=True)
    store.add_user("bench", PASSWORD, "editor")
    store.close()
    for i in range(runs):
        folder = root / "runs" / f"run-{i:03d}"
        folder.mkdir(parents=True)
        config = {"data": "data/x", "out_dir": f"runs/run-{i:03d}", "max_steps": steps, "seq_len": 256,
                  "model": {"family": "llama", "dim": 128 + 32 * (i % 4), "n_layers": 4},
                  "optim": {"lr": 1e-3 * (1 + i % 5), "warmup": 100}}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        with open(folder / "metrics.jsonl", "w") as f:
            for s in range(1, steps + 1):
                f.write(json.dumps({"step": s, "loss": 8 / (1 + s / 100), "lr": 1e-3, "tokens_per_s": 5e4,
                                    "grad_norm": 1.0, "tokens": 4096 * s, "time": s * 0.08}) + "\n")
                if s % 250 == 0:
                    f.write(json.dumps({"step": s, "val_loss": 8 / (1 + s / 100), "val_ppl": 1.0}) + "\n")
    live = root / "runs" / "live"
    live.mkdir(parents=True)
    (live / "config.yaml").write_text(yaml.safe_dump({"max_steps": 1000000, "out_dir": "runs/live"}))
    (live / "metrics.jsonl").write_text("")
    with Registry(root) as registry:
        registry.scan()
        registry.start_run(live, kind="pretrain", config={"max_steps": 1000000}, max_steps=1000000)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--steps", type=int, default=2000, help="metrics lines of each finished run")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--lines", type=int, default=20)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp) / "ws", args.runs, args.steps)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "llmlab", "studio", "--workspace", str(ws), "--port",
                                   str(port), "--devices", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for _ in range(300):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            client = httpx.Client(base_url=url, timeout=30)
            assert client.post("/login", data={"name": "bench", "password": PASSWORD}).status_code == 303
            page = client.get("/", headers={"accept": "text/html"})
            shown = page.text.count("<tr data-run=")
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                reply = client.get("/", headers={"accept": "text/html"})
                times.append((time.perf_counter() - t) * 1000)
                assert reply.status_code == 200
            print(f"runs page, {shown} runs ({len(page.content) / 1024:.0f} KiB): min {min(times):.1f} ms, "
                  f"median {statistics.median(times):.1f} ms, max {max(times):.1f} ms  (target < 300 ms)")

            run_id = re.search(r'<tr data-run="(\d+)">\s*<td>[^\n]*\n\s*<td><a href="/runs/\d+">live<', page.text)
            latencies = stream_latencies(client, int(run_id.group(1)), ws / "runs" / "live" / "metrics.jsonl",
                                         args.lines)
            print(f"metrics line to browser, {len(latencies)} lines: min {min(latencies) * 1000:.0f} ms, "
                  f"median {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms  "
                  "(target < 2000 ms)")
        finally:
            server.terminate()
            server.wait(timeout=30)


def stream_latencies(client, run_id: int, metrics: Path, lines: int) -> list[float]:
    """Seconds from writing each metrics line to its arrival on the run's event stream."""
    latencies = []

    def write():
        time.sleep(1.0)  # the stream is open
        with open(metrics, "a") as f:
            for step in range(1, lines + 1):
                f.write(json.dumps({"step": step, "loss": 1.0, "written": time.time()}) + "\n")
                f.flush()
                os.fsync(f.fileno())
                time.sleep(0.5)

    writer = threading.Thread(target=write)
    writer.start()
    with client.stream("GET", f"/runs/{run_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ["):
                now = time.time()
                latencies += [now - r["written"] for r in json.loads(line[6:]) if "written" in r]
                if len(latencies) >= lines:
                    break
    writer.join()
    return latencies


if __name__ == "__main__":
    main()
