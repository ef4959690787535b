"""The runs: the list, one run's page with its live charts, the actions on a run, read-only share
links, comparison, and the job queue's pages.

Live charts come from `GET /runs/{id}/events`, a server-sent event stream that tails the run's
`metrics.jsonl`: every complete line since the byte offset the browser last saw (`Last-Event-ID`),
then each new one within `TAIL_S` of being written, with the run's status and the end of its log.
Every browser watching a run reads the same file, so all see the same points.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shlex
import signal
import socket
import time
from pathlib import Path

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import StreamingResponse

from llmlab.common import finite_json
from llmlab.config import flatten
from llmlab.studio.jobrun import commands
from llmlab.studio.jobs import log_tail
from llmlab.studio.web import Id, Studio, done, need, refused
from llmlab.studio.workflow import TRAINERS

TAIL_S = 0.25
CHUNK_LINES = 2000  # metrics lines per event while catching up
MAX_COMMENT = 10_000
MAX_POINTS = 2000  # per curve on the compare page


def router(studio: Studio) -> APIRouter:
    r = APIRouter()

    @r.get("/")
    def runs_page(request: Request, status: str | None = None, tag: str | None = None):
        with studio.registry() as registry:
            runs = registry.runs(status if status in ("running", "finished", "stopped", "failed") else None)
            tags: dict[int, list[str]] = {}
            for run_id, name in registry.db.execute("SELECT run, tag FROM tags ORDER BY tag"):
                tags.setdefault(run_id, []).append(name)
        if tag:
            runs = [run for run in runs if tag in tags.get(run["id"], [])]
        return studio.page(request, "runs.html", runs=runs, tags=tags, status=status, tag=tag)

    def load(run_id: int) -> dict:
        with studio.registry() as registry:
            run = registry.by_id(run_id)
            if run is None:
                raise HTTPException(404, f"no run {run_id}")
            folder = studio.workspace / run["path"]
            run.update(config=json.loads(run["config"] or "{}"), tags=registry.tags(folder),
                       comments=registry.comments(folder), evaluations=registry.evaluations(folder),
                       artefacts=registry.artefacts(folder))
        with studio.store() as store:
            jobs = store.jobs(run=run["path"], limit=1)
            run["shares"] = store.shares(run["path"])
        run["job"] = jobs[0] if jobs else None  # the newest job that trained it, when the studio launched it
        return run

    @r.get("/runs/{run_id}")
    def run_page(request: Request, run_id: Id, gpus: int = 8, nodes: int = 1):
        run = load(run_id)
        gpus, nodes = min(max(gpus, 1), 1024), min(max(nodes, 1), 4096)
        return studio.page(request, "run.html", run=run, shared=None, torchrun=torchrun(run, gpus, nodes),
                           gpus=gpus, nodes=nodes, new_share=request.query_params.get("share"),
                           log=log_tail(studio.workspace, run["job"]["id"]) if run["job"] else "")

    @r.get("/runs/{run_id}/events")
    async def run_events(request: Request, run_id: Id):
        return events(studio, request, load(run_id))

    @r.post("/runs/{run_id}/stop")
    def stop(request: Request, run_id: Id):
        need(request, "editor")
        run = load(run_id)
        if run["status"] != "running":
            return refused(f"run {run['name']} is {run['status']}, not running")
        if run["job"] and run["job"]["status"] == "running":
            studio.queue.stop(run["job"]["id"])
        elif run["pid"] and run["host"] == socket.gethostname():  # a run started from the command line here
            try:
                os.kill(run["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
        else:
            return refused(f"run {run['name']} runs on {run['host']}; stop it there")
        return done(f"/runs/{run_id}", message="asked to stop: the run saves a checkpoint first")

    @r.post("/runs/{run_id}/resume")
    def resume(request: Request, run_id: Id):
        session = need(request, "editor")
        run = load(run_id)
        if run["status"] == "running" or studio.queue.active(run["path"]):
            return refused(f"run {run['name']} is running, or queued to")
        if run["kind"] not in TRAINERS or not (studio.workspace / run["path"] / "config.yaml").is_file():
            return refused(f"run {run['name']} cannot be resumed from the studio (kind {run['kind']})")
        if not any((studio.workspace / run["path"] / "checkpoints").glob("step-*")):
            return refused(f"run {run['name']} has no checkpoint to resume from")
        config = f"{run['path']}/config.yaml"
        studio.queue.submit(run["kind"], f"resume {run['name']}", [run["kind"], config, "ckpt.resume=auto"],
                            session["user"], run["path"])
        return done(f"/runs/{run_id}", message="queued")

    @r.post("/runs/{run_id}/delete")
    def delete(request: Request, run_id: Id):
        need(request, "editor")
        run = load(run_id)
        if run["status"] == "running" or studio.queue.active(run["path"]):
            return refused(f"run {run['name']} is running, or queued to; stop it first")
        folder = studio.workspace / run["path"]
        if folder.is_dir():  # kept in the trash, not destroyed
            trash = studio.workspace / ".llmlab" / "trash" / f"{run['name']}-{run_id}-{int(time.time())}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(trash)
        with studio.registry() as registry:
            registry.forget(folder)
        with studio.store() as store:
            store.revoke_all(run["path"])  # a new run of that folder is not the one shared
        return done("/", message=f"deleted run {run['name']} (its folder is in .llmlab/trash)")

    @r.post("/runs/{run_id}/comment")
    def comment(request: Request, run_id: Id, text: str = Form(..., max_length=MAX_COMMENT)):
        session = need(request, "viewer")  # feedback: every member may comment
        run = load(run_id)
        if not text.strip():
            return refused("write something first", "text")
        with studio.registry() as registry:
            registry.comment(studio.workspace / run["path"], session["user"], text)
        return done(f"/runs/{run_id}#comments")

    @r.post("/runs/{run_id}/tag")
    def tag(request: Request, run_id: Id, tag: str = Form(..., max_length=64)):
        need(request, "editor")
        run = load(run_id)
        tag = tag.strip()
        if not tag:
            return refused("an empty tag", "tag")
        with studio.registry() as registry:
            registry.tag(studio.workspace / run["path"], tag)
        return done(f"/runs/{run_id}")

    @r.post("/runs/{run_id}/share")
    def share(request: Request, run_id: Id):
        session = need(request, "editor")
        run = load(run_id)
        with studio.store() as store:
            token = store.share(run["path"], session["user"])
        return done(f"/runs/{run_id}?share={token}#sharing")

    @r.post("/runs/{run_id}/shares/{share_id}/revoke")
    def revoke(request: Request, run_id: Id, share_id: Id):
        need(request, "editor")
        run = load(run_id)
        with studio.store() as store:
            store.revoke(share_id, run["path"])
        return done(f"/runs/{run_id}#sharing")

    def shared(token: str) -> dict:
        with studio.store() as store:
            key = store.shared_run(token)
        with studio.registry() as registry:
            run = registry.run(studio.workspace / key) if key else None
        if run is None:
            raise HTTPException(404, "no such share link (revoked, or never made)")
        return load(run["id"])

    @r.get("/share/{token}")
    def shared_page(request: Request, token: str):
        run = shared(token)
        return studio.page(request, "run.html", run=run, shared=token, torchrun="", gpus=0, nodes=0, new_share=None,
                           log="")

    @r.get("/share/{token}/events")
    async def shared_events(request: Request, token: str):
        return events(studio, request, shared(token), with_log=False)

    @r.get("/compare")
    def compare(request: Request):
        ids = []
        for value in request.query_params.getlist("run"):
            if not (value.isascii() and value.isdigit() and len(value) <= 18):
                raise HTTPException(400, f"run={value[:40]!r}: expected a run id")
            ids.append(int(value))
        runs = [load(i) for i in list(dict.fromkeys(ids))[:12]]
        curves = {run["id"]: thin(read_metrics(studio.workspace / run["path"] / "metrics.jsonl")[0]) for run in runs}
        return studio.page(request, "compare.html", runs=runs, curves=curves, diff=config_diff(runs),
                           table=evaluation_table(runs))

    @r.get("/jobs")
    def jobs_page(request: Request):
        with studio.store() as store:
            jobs = store.jobs()
        return studio.page(request, "jobs.html", jobs=jobs, devices=studio.devices)

    @r.get("/jobs/{job_id}")
    def job_page(request: Request, job_id: Id):
        with studio.store() as store:
            job = store.job(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return studio.page(request, "job.html", job=job, run_id=run_of(job), log=log_tail(studio.workspace, job_id),
                           command=" && ".join(shlex.join(["llmlab", *c]) for c in commands(job["argv"])))

    def run_of(job: dict) -> int | None:
        """The id of the run a job trains, once the run has registered."""
        if not job["run"]:
            return None
        with studio.registry() as registry:
            run = registry.run(studio.workspace / job["run"])
        return run["id"] if run else None

    @r.get("/jobs/{job_id}/log")
    def job_log(job_id: Id):
        with studio.store() as store:
            job = store.job(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return {"status": job["status"], "exit_code": job["exit_code"], "log": log_tail(studio.workspace, job_id),
                "run_id": run_of(job)}

    @r.post("/jobs/{job_id}/stop")
    def job_stop(request: Request, job_id: Id):
        need(request, "editor")
        studio.queue.stop(job_id)
        return done(f"/jobs/{job_id}", message="asked to stop")

    return r


# --------------------------------------------------------------------------- live metrics


def read_metrics(file: Path, offset: int = 0, max_lines: int | None = None) -> tuple[list[dict], int]:
    """The records of the complete lines of `file` from byte `offset` (at most `max_lines`), and the
    offset after the last one read; a line being written, or not JSON, is skipped."""
    records = []
    try:
        with open(file, "rb") as f:
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # still being written
                offset += len(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(finite_json(record))
                if max_lines is not None and len(records) >= max_lines:
                    break
    except (FileNotFoundError, IsADirectoryError):
        pass
    return records, offset


def thin(records: list[dict], most: int = MAX_POINTS) -> list[dict]:
    """At most about `most` of `records`, evenly spread, the validation lines all kept."""
    train = [r for r in records if "loss" in r]
    if len(train) <= most:
        return records
    every = math.ceil(len(train) / most)
    kept = {id(r) for r in train[::every]} | {id(train[-1])}
    return [r for r in records if "loss" not in r or id(r) in kept]


def events(studio: Studio, request: Request, run: dict, with_log: bool = True) -> StreamingResponse:
    metrics = studio.workspace / run["path"] / "metrics.jsonl"
    last = request.headers.get("last-event-id", "0")
    start = int(last) if last.isascii() and last.isdigit() and len(last) <= 18 else 0
    try:
        if start > metrics.stat().st_size:  # not an offset of this file (of one since replaced): from the start
            start = 0
    except OSError:
        start = 0
    job_id = run["job"]["id"] if run["job"] else None

    async def stream():
        offset, status, log = start, None, None
        registry = studio.registry()  # one connection for the stream's life, in the event loop's thread
        try:
            yield "retry: 2000\n\n"
            while not await request.is_disconnected():
                records, offset = read_metrics(metrics, offset, CHUNK_LINES)
                if records:
                    yield f"id: {offset}\nevent: metrics\ndata: {json.dumps(records)}\n\n"
                    if len(records) == CHUNK_LINES:
                        continue  # catching up: no pause
                now = registry.by_id(run["id"])
                if now is None:
                    yield "event: gone\ndata: {}\n\n"
                    return
                if now["status"] != status:
                    status = now["status"]
                    yield f"event: status\ndata: {json.dumps({'status': status, 'step': now['step']})}\n\n"
                if with_log and job_id is not None:
                    tail = log_tail(studio.workspace, job_id, 8192)
                    if tail != log:
                        log = tail
                        yield f"event: log\ndata: {json.dumps(tail)}\n\n"
                if status != "running" and not records:
                    records, offset = read_metrics(metrics, offset)  # the lines written as it ended
                    if records:
                        yield f"id: {offset}\nevent: metrics\ndata: {json.dumps(records)}\n\n"
                    yield "event: end\ndata: {}\n\n"
                    return
                await asyncio.sleep(TAIL_S)
        finally:
            registry.close()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


# --------------------------------------------------------------------------- comparing, launching elsewhere


def config_diff(runs: list[dict]) -> list[tuple[str, list]]:
    """(key, value of each run) for every config key on which the runs differ."""
    flats = [flatten(run["config"]) for run in runs]
    keys = sorted(set().union(*flats)) if flats else []
    missing = object()
    rows = []
    for key in keys:
        values = [flat.get(key, missing) for flat in flats]
        if any(v != values[0] for v in values[1:]):
            rows.append((key, ["—" if v is missing else json.dumps(v) for v in values]))
    return rows


def evaluation_table(runs: list[dict]) -> list[tuple[str, str, list]]:
    """(task, metric, each run's value or None) for every score any of the runs has."""
    scores = {}
    for i, run in enumerate(runs):
        for e in run["evaluations"]:
            scores.setdefault((e["task"], e["metric"]), [None] * len(runs))[i] = e["value"]
    return [(task, metric, values) for (task, metric), values in sorted(scores.items())]


def torchrun(run: dict, gpus: int, nodes: int) -> str:
    """The command that trains this run's config on `nodes` machines of `gpus` GPUs each, from the
    workspace folder (on every machine, for several)."""
    if run["kind"] not in TRAINERS:
        return ""
    launch = ["torchrun", f"--nproc_per_node={gpus}"]
    if nodes > 1:  # $NODE_RANK and $MASTER_ADDR are left for each machine's shell to fill in
        launch += [f"--nnodes={nodes}", "--node_rank=$NODE_RANK", "--rdzv_backend=c10d",
                   "--rdzv_endpoint=$MASTER_ADDR:29500"]
    else:
        launch.append("--standalone")
    return " ".join([*launch, "-m", "llmlab", run["kind"], shlex.quote(f"{run['path']}/config.yaml")])
