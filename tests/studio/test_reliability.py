"""What the studio must survive: being killed while a run trains (the run goes on and is shown, and
stopped, by the next studio), a command-line run writing the registry while the studio reads it,
and two viewers of one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llmlab.studio.store import Store
from llmlab.track import Registry

from .conftest import StudioProcess, free_port
from .test_jobs import launch, wait_run

pytestmark = pytest.mark.slow
SMALL = ["data=data/tiny", "model.dim=32", "model.n_layers=1", "seq_len=32", "batch_size=4", "system.autocast=none",
         "log_every=1"]


def _events(client, run: int) -> list[dict]:
    """The metrics records a run's event stream sends before its first status event: every line
    written so far."""
    records = []
    with client.http.stream("GET", f"/runs/{run}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ["):
                records += json.loads(line[6:])
            elif line == "event: status":
                break
    return records


def test_killing_the_studio_loses_no_run_and_the_next_studio_shows_and_stops_it(workspace):
    studio = StudioProcess(workspace)
    try:
        editor = studio.client("ed")
        job = launch(editor, "survivor", **{"f.max_steps": "100000", "f.ckpt.every": "100000"})
        run = wait_run(workspace, "survivor", lambda r: (r["step"] or 0) >= 3)
        cookies = dict(editor.http.cookies)
    finally:
        studio.kill()  # SIGKILL: no chance to clean up
    with Store(workspace) as store:
        pid = store.job(job)["pid"]
    os.kill(pid, 0)  # the job's process lives on
    step = run["step"]
    wait_run(workspace, "survivor", lambda r: r["step"] > step + 5)  # and trains

    again = StudioProcess(workspace)
    second = subprocess.run([sys.executable, "-m", "llmlab", "studio", "--workspace", str(workspace), "--port",
                             str(free_port())], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "another llmlab studio serves this workspace" in second.stderr
    try:
        editor = again.client()
        editor.http.cookies.update(cookies)  # sessions live in the workspace: the same browser stays logged in
        page = editor.get(f"/runs/{run['id']}")
        assert page.status_code == 200 and 'class="status running"' in page.text
        editor.csrf = page.text.split('name="csrf" content="', 1)[1].split('"', 1)[0]
        records = _events(editor, run["id"])
        assert [r["step"] for r in records if "loss" in r][:5] == [1, 2, 3, 4, 5]
        assert editor.post(f"/runs/{run['id']}/stop").status_code == 200
        assert editor.wait_job(job)["status"] == "stopped"
        stopped = wait_run(workspace, "survivor", lambda r: r["status"] == "stopped")
        assert (workspace / "runs" / "survivor" / "checkpoints" / f"step-{stopped['step']:08d}").is_dir()
    finally:
        again.kill()


def test_a_command_line_run_writes_the_registry_while_the_studio_reads_it(workspace):
    studio = StudioProcess(workspace)
    try:
        viewer = studio.client("vic")
        cli = subprocess.Popen([sys.executable, "-m", "llmlab", "pretrain", *SMALL, "out_dir=runs/cli", "max_steps=60"],
                               cwd=workspace, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        pages = 0
        while cli.poll() is None:
            assert viewer.get("/").status_code == 200
            pages += 1
        assert cli.returncode == 0, cli.stderr.read().decode()[-2000:]
        assert pages > 5
        with Registry(workspace) as registry:
            run = registry.run(workspace / "runs" / "cli")
        assert run["status"] == "finished" and run["step"] == 60
        assert f'href="/runs/{run["id"]}">cli<' in viewer.get("/").text
        # two viewers of one run see the same points
        first, second = _events(viewer, run["id"]), _events(studio.client("ed"), run["id"])
        assert first == second and len([r for r in first if "loss" in r]) == 60
    finally:
        studio.kill()
