"""Jobs that really run: data preparation and training launched from the studio, the queue's one job
per device, stop (which saves) and resume, and a studio that restarts while its jobs go on."""

from __future__ import annotations

import json
import time

import pytest

from llmlab.studio.jobs import JobQueue, job_dir
from llmlab.studio.store import Store
from llmlab.track import Registry

from .conftest import Served, corpus_lines, free_port, httpx

pytestmark = pytest.mark.slow
TINY = {"f.data": "data/tiny", "f.model.dim": "32", "f.model.n_layers": "1", "f.model.n_heads": "2",
        "f.model.n_kv_heads": "2", "f.model.head_dim": "16", "f.model.hidden_dim": "64", "f.seq_len": "32",
        "f.batch_size": "4", "f.log_every": "1", "f.system.autocast": "none", "f.eval.every": "1000"}


def launch(client, name: str, **fields) -> int:
    reply = client.post("/configure", data={"verb": "pretrain", "name": name, "action": "launch", **TINY, **fields})
    assert reply.status_code == 200, reply.text
    return int(reply.json()["redirect"].rsplit("/", 1)[1])


def wait_run(workspace, name: str, until, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Registry(workspace) as registry:
            run = registry.run(workspace / "runs" / name)
        if run is not None and until(run):
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {name}: {run}")


def test_launched_runs_queue_train_and_are_evaluated_exported_and_served(workspace):
    with Served(workspace, devices=("cpu",)) as served:
        editor = served.client("ed")
        first, second = launch(editor, "one", **{"f.max_steps": "30"}), launch(editor, "two", **{"f.max_steps": "5"})
        with Store(workspace) as store:
            assert store.job(second)["status"] == "queued"  # the one device is busy with the first
        again = editor.post("/configure", data={"verb": "pretrain", "name": "two", "action": "launch", "replace": "on",
                                                **TINY})
        assert again.status_code == 400 and "queued or running" in again.json()["error"]
        assert editor.wait_job(first)["status"] == "finished"
        state = editor.wait_job(second)
        assert state["status"] == "finished" and "stopped after step 5" in state["log"]
        with Store(workspace) as store:
            one, two = store.job(first), store.job(second)
        assert one["ended"] <= two["started"] and one["device"] == two["device"] == "cpu"
        with Registry(workspace) as registry:
            run = registry.run(workspace / "runs" / "one")
        assert (run["status"], run["kind"], run["owner"], run["step"]) == ("finished", "pretrain", "ed", 30)
        assert (workspace / "configs" / "one.yaml").is_file()
        page = editor.get(f"/jobs/{first}").text
        assert f'href="/runs/{run["id"]}"' in page and "llmlab pretrain configs/one.yaml" in page
        again = editor.post("/configure", data={"verb": "pretrain", "name": "one", "action": "launch", **TINY})
        assert again.status_code == 400 and "runs/one exists already" in again.json()["error"]

        # the finished run, evaluated, exported and served from the studio
        notes = b"the cat sat on a mat and a dog ran far. " * 20
        editor.post("/data/upload", params={"name": "notes.txt"}, content=notes)

        reply = editor.post("/evaluate", data={"checkpoint": "runs/two", "extra": "notes.txt", "limit": "2"})
        state = editor.wait_job(int(reply.json()["redirect"].rsplit("/", 1)[1]))
        assert state["status"] == "finished", state["log"][-2000:]
        [folder] = (workspace / "evals").iterdir()
        results = json.loads((folder / "results.json").read_text())
        expected = {m: v["value"] for m, v in results["results"][0]["metrics"].items()}
        assert f"/evaluate/{folder.name}" in editor.get("/evaluate").text
        assert "uploads/notes.txt" in editor.get(f"/evaluate/{folder.name}").text  # its samples
        with Registry(workspace) as registry:
            recorded = {e["metric"]: e["value"] for e in registry.evaluations(workspace / "runs" / "two")}
        assert recorded == pytest.approx(expected) and "word_perplexity" in recorded

        reply = editor.post("/deploy/export", data={"checkpoint": "runs/two", "to": "hf", "name": "two-hf"})
        assert editor.wait_job(int(reply.json()["redirect"].rsplit("/", 1)[1]))["status"] == "finished"
        assert (workspace / "exports" / "two-hf" / "config.json").is_file()
        assert "exports/two-hf" in editor.get("/chat").text  # an export is a checkpoint too

        port = free_port()
        reply = editor.post("/deploy/serve", data={"checkpoint": "runs/two", "port": str(port), "name": "tiny"})
        assert reply.status_code == 200, reply.text
        with Store(workspace) as store:
            [job] = store.jobs("running", kind="serve")
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()["data"][0]["id"] == "tiny":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, editor.http.get(f"/jobs/{job['id']}/log").json()["log"]
            time.sleep(0.3)
        page = editor.get("/deploy").text
        assert f"http://127.0.0.1:{port}/v1/chat/completions" in page and f'base_url="http://127.0.0.1:{port}/v1"' \
            in page
        reply = editor.post("/deploy/serve", data={"checkpoint": "runs/two", "port": str(port)})
        assert reply.status_code == 400 and reply.json()["field"] == "port"  # taken by that server
        assert editor.post(f"/jobs/{job['id']}/stop").status_code == 200
        assert editor.wait_job(job["id"])["status"] == "stopped"


def test_stop_saves_and_resume_goes_on_to_the_end(workspace):
    with Served(workspace) as served:
        editor = served.client("ed")
        job = launch(editor, "long", **{"f.max_steps": "100000", "f.ckpt.every": "100000"})
        run = wait_run(workspace, "long", lambda r: (r["step"] or 0) >= 3)
        reply = editor.post(f"/runs/{run['id']}/stop")
        assert reply.status_code == 200 and "saves a checkpoint" in reply.json()["message"]
        assert editor.wait_job(job)["status"] == "stopped"
        run = wait_run(workspace, "long", lambda r: r["status"] == "stopped")
        checkpoints = sorted((workspace / "runs" / "long" / "checkpoints").glob("step-*"))
        assert checkpoints and checkpoints[-1].name == f"step-{run['step']:08d}"
        # resume it with fewer steps to go: the config's max_steps is the run's own, so lower it first
        config = workspace / "runs" / "long" / "config.yaml"
        config.write_text(config.read_text().replace("max_steps: 100000", f"max_steps: {run['step'] + 4}"))
        reply = editor.post(f"/runs/{run['id']}/resume")
        assert reply.status_code == 200, reply.text
        with Store(workspace) as store:
            resumed = store.jobs(kind="pretrain")[0]
        assert resumed["argv"][-1] == "ckpt.resume=auto"
        state = editor.wait_job(resumed["id"])
        assert state["status"] == "finished", state["log"][-2000:]
        assert "resumed" in state["log"].lower()
        done = wait_run(workspace, "long", lambda r: r["status"] == "finished")
        assert done["step"] == run["step"] + 4


def test_prepare_trains_a_tokenizer_then_prepares_and_stops_at_the_first_failure(workspace):
    with Served(workspace) as served:
        editor = served.client("ed")
        assert editor.post("/data/upload", params={"name": "corpus.jsonl"}, content=corpus_lines(80).encode()
                           ).status_code == 200
        reply = editor.post("/data/prepare", data={"name": "mine", "inputs": ["corpus.jsonl"], "vocab_size": "280",
                                                   "val_frac": "0.1"})
        job = int(reply.json()["redirect"].rsplit("/", 1)[1])
        state = editor.wait_job(job)
        assert state["status"] == "finished", state["log"]
        manifest = json.loads((workspace / "data" / "mine" / "manifest.json").read_text())
        assert manifest["vocab_size"] == 280 and manifest["documents"]["kept"] == 80
        page = editor.get("/data").text
        assert "data/mine" in page and "80 kept" in page
        # a JSONL without the text field: the tokenizer fails, so data prepare never runs
        editor.post("/data/upload", params={"name": "other.jsonl"}, content=b'{"body": "no text field here"}\n' * 5)
        reply = editor.post("/data/prepare", data={"name": "bad", "inputs": ["other.jsonl"], "vocab_size": "280"})
        state = editor.wait_job(int(reply.json()["redirect"].rsplit("/", 1)[1]))
        assert state["status"] == "failed" and "text" in state["log"]
        assert not (workspace / "data" / "bad").exists()
        reply = editor.post("/data/prepare", data={"name": "mine", "inputs": ["corpus.jsonl"]})
        assert reply.status_code == 400 and "exists already" in reply.json()["error"]
        reply = editor.post("/data/prepare", data={"name": "x", "inputs": ["../../etc/passwd.jsonl"]})
        assert reply.status_code == 400 and "not an uploaded file" in reply.json()["error"]


def test_jobs_outlive_the_queue_that_started_them(workspace):
    """A studio that stops (or is killed) leaves its jobs running; the next one adopts and settles them."""
    first = JobQueue(workspace)
    job = first.submit("pretrain", "t", ["pretrain", "data=data/tiny", "out_dir=runs/adopted", "max_steps=40",
                                         "model.dim=32", "model.n_layers=1", "seq_len=32", "batch_size=4",
                                         "system.autocast=none"], "ed", "runs/adopted")
    first.close()  # the queue goes; its job does not
    with Store(workspace) as store:
        assert store.job(job)["status"] == "running"
    second = JobQueue(workspace)
    deadline = time.monotonic() + 60
    while second.store.job(job)["status"] == "running" and time.monotonic() < deadline:
        second.tick()
        time.sleep(0.3)
    assert second.store.job(job)["status"] == "finished"
    assert (job_dir(workspace, job) / "exit_code").read_text() == "0\n"
    second.close()
