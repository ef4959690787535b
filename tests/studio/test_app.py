"""The studio over HTTP: the session and CSRF gate, roles, escaping, uploads, login throttling, share
links, the config form, live metrics and comparison. Runs here are folders written by hand (a
config.yaml and a metrics.jsonl), which the registry indexes; jobs that really train are in
test_jobs.py."""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import pytest
import yaml
from fastapi.routing import APIRoute

from llmlab.config import load_config
from llmlab.studio.app import create_app
from llmlab.studio.store import FREE_FAILURES
from llmlab.train.pretrain import PretrainConfig

from .conftest import PASSWORDS, Served


def fake_run(ws: Path, name: str, steps: int = 20, **config) -> Path:
    """A finished run folder as pretrain leaves it: config.yaml and metrics.jsonl."""
    folder = ws / "runs" / name
    folder.mkdir(parents=True)
    cfg = {"data": "data/tiny", "out_dir": f"runs/{name}", "max_steps": steps, "model": {"dim": 32}, **config}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [{"step": s, "loss": 6 - s / 10, "lr": 1e-3, "tokens_per_s": 1000.0, "tokens": 64 * s, "time": s / 10}
             for s in range(1, steps + 1)]
    lines.append({"step": steps, "val_loss": 5.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def run_id(client, name: str) -> int:
    page = client.get("/").text
    return int(re.search(rf'<tr data-run="(\d+)">\s*<td>[^\n]*\n\s*<td><a href="/runs/\d+">{re.escape(name)}<', page)
               .group(1))


def api_routes(router):
    for route in router.routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # an included router
            yield from api_routes(route.original_router)


@pytest.fixture
def with_runs(workspace):
    fake_run(workspace, "a", steps=20)
    fake_run(workspace, "b", steps=30, seq_len=64)
    with Served(workspace) as s:
        yield s


# ------------------------------------------------------------------ the gate


def test_only_login_health_and_static_answer_without_a_session(with_runs):
    anonymous = with_runs.client()
    routes = list(api_routes(create_app(with_runs.studio)))
    assert len(routes) > 30
    for route in routes:
        path = re.sub(r"\{[^}]+\}", "1", route.path)
        for method in route.methods - {"HEAD"}:
            reply = anonymous.http.request(method, path, headers={"accept": "application/json"})
            if route.path in ("/login", "/health") or route.path.startswith("/static/"):
                assert reply.status_code in (200, 401, 404, 422), (method, path, reply.status_code)
                continue
            if route.path.startswith("/share/"):  # a share token opens one run; a wrong one nothing
                assert reply.status_code == 404, (method, path)
                continue
            assert reply.status_code == 401, (method, path, reply.status_code)
    page = anonymous.get("/runs/1?x=1")
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/runs/1"


def test_every_page_renders_for_every_role(with_runs):
    for user in PASSWORDS:
        client = with_runs.client(user)
        a = run_id(client, "a")
        for path in ["/", "/?status=finished", f"/runs/{a}", f"/runs/{a}?gpus=4&nodes=2", f"/compare?run={a}", "/data",
                     "/model", "/model?source=run&run=runs/a", "/configure", "/configure?verb=finetune",
                     "/configure?verb=align", "/jobs", "/evaluate", "/chat", "/deploy"]:
            reply = client.get(path)
            assert reply.status_code == 200, (user, path, reply.text[:300])
            assert "internal error" not in reply.text


def test_a_viewer_cannot_launch_stop_or_delete(with_runs):
    viewer = with_runs.client("vic")
    a = run_id(viewer, "a")
    for path, data in [("/configure", {"verb": "pretrain", "name": "x", "action": "launch"}),
                       ("/configure", {"verb": "pretrain", "name": "x", "action": "save"}),
                       (f"/runs/{a}/stop", {}), (f"/runs/{a}/resume", {}), (f"/runs/{a}/delete", {}),
                       (f"/runs/{a}/share", {}), (f"/runs/{a}/tag", {"tag": "t"}), ("/jobs/1/stop", {}),
                       ("/data/prepare", {"name": "d", "inputs": "x.jsonl"}), ("/data/synth", {"name": "s"}),
                       ("/evaluate", {"checkpoint": "runs/a", "tasks": "synth"}),
                       ("/deploy/serve", {"checkpoint": "runs/a"}), ("/deploy/export", {"checkpoint": "runs/a",
                                                                                         "name": "e"})]:
        reply = viewer.post(path, data=data)
        assert reply.status_code == 403, (path, reply.status_code, reply.text)
    assert viewer.post("/data/upload?name=x.jsonl", content=b"{}").status_code == 403
    assert (with_runs.studio.workspace / "runs" / "a").is_dir()
    assert not (with_runs.studio.workspace / "uploads").exists()
    # what a viewer may do: look, check a config, comment
    assert viewer.post("/configure", data={"verb": "pretrain", "name": "x", "action": "check"}).status_code == 200
    assert viewer.post(f"/runs/{a}/comment", data={"text": "looks good"}).status_code == 200
    assert "looks good" in viewer.get(f"/runs/{a}").text


def test_a_request_without_the_csrf_token_is_refused(with_runs):
    editor, other = with_runs.client("ed"), with_runs.client("ann")
    a = run_id(editor, "a")
    for headers in ({}, {"x-csrf-token": "forged"}, {"x-csrf-token": other.csrf}):
        reply = editor.post(f"/runs/{a}/tag", csrf=False, data={"tag": "t"}, headers=headers)
        assert reply.status_code == 403 and "CSRF" in reply.json()["error"]
    assert editor.post(f"/runs/{a}/tag", data={"tag": "kept"}).status_code == 200
    assert "kept" in editor.get(f"/runs/{a}").text


def test_sessions_are_httponly_samesite_cookies_and_pages_forbid_framing(with_runs):
    client = with_runs.client()
    reply = client.http.post("/login", data={"name": "ed", "password": PASSWORDS["ed"], "next": "//evil.example/x"})
    assert reply.status_code == 303 and reply.headers["location"] == "/"  # never off to another site
    cookie = reply.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = client.get("/")
    assert page.headers["x-frame-options"] == "DENY"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text  # no inline script: the policy allows none
    client.csrf = re.search(r'name="csrf" content="([^"]+)"', page.text).group(1)
    assert client.post("/logout").json() == {"redirect": "/login"}
    assert client.get("/").status_code == 303


def test_names_and_comments_holding_markup_are_shown_escaped(workspace):
    fake_run(workspace, "<script>alert(1)")  # a folder name holds no slash
    with Served(workspace) as served:
        editor = served.client("ed")
        run = int(re.search(r'<tr data-run="(\d+)"', editor.get("/").text).group(1))
        editor.post(f"/runs/{run}/comment", data={"text": "<script>alert(2)</script><img src=x onerror=alert(3)>"})
        editor.post(f"/runs/{run}/tag", data={"tag": "<b>bold</b>"})
        for page in (editor.get("/").text, editor.get(f"/runs/{run}").text, editor.get(f"/compare?run={run}").text):
            assert "<script>alert" not in page and "<img src=x" not in page and "<b>bold" not in page
            assert "&lt;script&gt;alert(1)" in page or "\\u003cscript\\u003ealert(1)" in page


def test_ten_wrong_passwords_slow_further_tries(served):
    client = served.client()
    for _ in range(FREE_FAILURES):
        reply = client.http.post("/login", data={"name": "ed", "password": "wrong-password"})
        assert reply.status_code == 401 and "wrong name or password" in reply.text
    reply = client.http.post("/login", data={"name": "ed", "password": PASSWORDS["ed"]})
    assert reply.status_code == 429 and int(reply.headers["retry-after"]) >= 30
    assert "set-cookie" not in reply.headers
    assert served.client("ann").csrf  # other accounts log in as before


# ------------------------------------------------------------------ uploads


def test_an_upload_named_with_dots_and_slashes_lands_in_the_uploads_folder(served):
    editor = served.client("ed")
    ws = served.studio.workspace
    for name in ("../../x.jsonl", "..\\..\\x.jsonl", "/etc/x.jsonl", ".hidden.jsonl"):
        reply = editor.post("/data/upload", params={"name": name}, content=b'{"text": "hello"}\n')
        assert reply.status_code == 200, reply.text
    assert sorted(p.name for p in (ws / "uploads").iterdir()) == ["hidden.jsonl", "x-1.jsonl", "x-2.jsonl",
                                                                  "x.jsonl"]
    assert not (ws.parent / "x.jsonl").exists() and not (ws.parent.parent / "x.jsonl").exists()
    for name in ("", "..", "notes.exe"):
        reply = editor.post("/data/upload", params={"name": name}, content=b"x")
        assert reply.status_code == 400 and "expected a name ending in" in reply.json()["error"]


def test_an_oversized_upload_is_refused_with_nothing_left_on_disk(workspace):
    with Served(workspace, max_upload_bytes=1000) as served:
        editor = served.client("ed")
        reply = editor.post("/data/upload", params={"name": "big.jsonl"}, content=b"x" * 5000)
        assert reply.status_code == 413 and "limit" in reply.json()["error"]

        def chunks():  # no Content-Length: refused while streaming
            for _ in range(10):
                yield b"y" * 300

        reply = editor.post("/data/upload", params={"name": "big.jsonl"}, content=chunks())
        assert reply.status_code == 413
        assert list((workspace / "uploads").iterdir()) == []
        assert editor.post("/data/upload", params={"name": "ok.jsonl"}, content=b"z" * 1000).status_code == 200
        assert (workspace / "uploads" / "ok.jsonl").read_bytes() == b"z" * 1000


# ------------------------------------------------------------------ runs, sharing, comparing


def test_a_share_link_shows_one_run_read_only_until_revoked(with_runs):
    editor, anonymous = with_runs.client("ed"), with_runs.client()
    a = run_id(editor, "a")
    reply = editor.post(f"/runs/{a}/share")
    token = re.search(r"share=([^#]+)", reply.json()["redirect"]).group(1)
    page = anonymous.get(f"/share/{token}")
    assert page.status_code == 200 and "read-only" in page.text
    assert "data-post" not in page.text and "/runs/" not in page.text  # no action, no way into the studio
    with anonymous.http.stream("GET", f"/share/{token}/events") as events:
        body = b"".join(events.iter_bytes())
    assert body.count(b"event: metrics") >= 1 and b"event: end" in body
    assert anonymous.get(f"/runs/{a}").status_code == 303  # the rest of the studio stays closed
    share_id = re.search(r"shares/(\d+)/revoke", editor.get(f"/runs/{a}").text).group(1)
    assert editor.post(f"/runs/{a}/shares/{share_id}/revoke").status_code == 200
    assert anonymous.get(f"/share/{token}").status_code == 404


def test_the_event_stream_sends_each_metrics_line_once_and_resumes_from_last_event_id(with_runs):
    client = with_runs.client("vic")
    a = run_id(client, "a")
    with client.http.stream("GET", f"/runs/{a}/events") as events:
        body = b"".join(events.iter_bytes()).decode()
    blocks = [b for b in body.split("\n\n") if "event: metrics" in b]
    records = [r for b in blocks for r in json.loads(b.split("data: ", 1)[1])]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21))
    assert [r["val_loss"] for r in records if "val_loss" in r] == [5.0]
    offset = re.search(r"id: (\d+)", blocks[-1]).group(1)
    assert int(offset) == (with_runs.studio.workspace / "runs" / "a" / "metrics.jsonl").stat().st_size
    with client.http.stream("GET", f"/runs/{a}/events", headers={"last-event-id": offset}) as events:
        again = b"".join(events.iter_bytes()).decode()
    assert "event: metrics" not in again and "event: end" in again


def test_a_running_runs_new_lines_reach_the_stream_as_they_are_written(workspace):
    from llmlab.track import Registry

    folder = fake_run(workspace, "live", steps=3)
    with Registry.create(workspace) as registry:
        registry.start_run(folder, kind="pretrain", config={"max_steps": 100}, max_steps=100)
    with Served(workspace) as served:
        client = served.client("vic")
        run = run_id(client, "live")
        seen = []
        with client.http.stream("GET", f"/runs/{run}/events") as events:
            lines = events.iter_lines()
            written = None
            for line in lines:
                if line.startswith("data: [") and '"loss"' in line:
                    steps = [r["step"] for r in json.loads(line[6:]) if "loss" in r]
                    seen += steps
                    if written is None:
                        with open(folder / "metrics.jsonl", "a") as f:  # a line half written, then finished
                            f.write('{"step": 4, "loss": 1.5, "lr"')
                            f.flush()
                            time.sleep(0.6)
                            f.write(': 0.001}\n')
                        written = time.monotonic()
                    elif 4 in steps:
                        assert time.monotonic() - written < 2.0
                        break
        assert seen == [1, 2, 3, 4]


def test_compare_overlays_runs_and_lists_their_config_differences(with_runs):
    client = with_runs.client("vic")
    a, b = run_id(client, "a"), run_id(client, "b")
    from llmlab.track import Registry

    with Registry(with_runs.studio.workspace) as registry:
        registry.record_evaluation(with_runs.studio.workspace / "runs" / "a", "synth", {"exact_match": 0.25})
    page = client.get(f"/compare?run={a}&run={b}").text
    data = json.loads(re.search(r'<script type="application/json" id="compare-data">(.*?)</script>', page).group(1))
    assert data["runs"] == ["a", "b"] and len(data["curves"][str(a)]) == 21 and len(data["curves"][str(b)]) == 31
    diff = re.search(r'<table class="diff">(.*?)</table>', page, re.S).group(1)
    assert "max_steps" in diff and "seq_len" in diff and "model.dim" not in diff
    assert "exact_match" in page and "0.25" in page
    assert client.get("/compare?run=a").status_code == 400


def test_stop_delete_and_resume_answer_for_runs_that_cannot(with_runs):
    editor = with_runs.client("ed")
    a = run_id(editor, "a")
    assert "not running" in editor.post(f"/runs/{a}/stop").json()["error"]
    assert "no checkpoint" in editor.post(f"/runs/{a}/resume").json()["error"]
    assert editor.post(f"/runs/{a}/delete").status_code == 200
    ws = with_runs.studio.workspace
    assert not (ws / "runs" / "a").exists() and len(list((ws / ".llmlab" / "trash").iterdir())) == 1
    assert editor.get(f"/runs/{a}").status_code == 404
    assert ">a<" not in editor.get("/").text.replace("runs/a", "")


def test_the_run_page_shows_the_torchrun_command_for_gpus_and_nodes(with_runs):
    client = with_runs.client("vic")
    a = run_id(client, "a")
    page = client.get(f"/runs/{a}?gpus=4&nodes=1").text
    assert "torchrun --nproc_per_node=4 --standalone -m llmlab" in page
    page = client.get(f"/runs/{a}?gpus=8&nodes=2").text
    assert "--nnodes=2 --node_rank=$NODE_RANK" in page and "runs/a/config.yaml" in page


# ------------------------------------------------------------------ configure


def test_the_config_form_checks_like_the_command_line_and_saves_what_it_shows(served):
    editor = served.client("ed")
    page = editor.get("/configure").text
    assert 'name="f.optim.lr"' in page and 'name="f.model.family"' in page
    reply = editor.post("/configure", data={"verb": "pretrain", "name": "r1", "action": "check", "f.optim.lr": "abc"})
    assert reply.status_code == 400 and reply.json()["field"] == "f.optim.lr"
    assert "expected float" in reply.json()["error"]
    reply = editor.post("/configure", data={"verb": "pretrain", "name": "r1", "action": "check", "f.max_steps": "0"})
    assert reply.json()["field"] == "f.max_steps" and ">= 1" in reply.json()["error"]
    reply = editor.post("/configure", data={"verb": "pretrain", "name": "r1", "action": "check", "f.eval.every": "0"})
    assert reply.json()["field"] == "f.eval.every"  # a section's own check names the section and the key
    reply = editor.post("/configure", data={"verb": "pretrain", "name": "r1", "action": "check", "f.nope": "1"})
    assert reply.status_code == 400 and "unknown config keys: nope" in reply.json()["error"]
    form = {"verb": "pretrain", "name": "r1", "f.max_steps": "7", "f.data": "data/tiny", "f.model.dim": "48",
            "f.optim.lr": "0.002", "f.seq_len": "64"}
    command = editor.post("/configure", data={**form, "action": "check"}).json()["command"]
    assert editor.post("/configure", data={**form, "action": "save"}).json()["message"] == "saved configs/r1.yaml"
    saved = load_config(PretrainConfig, served.studio.workspace / "configs" / "r1.yaml")
    words = shlex.split(command)
    assert words[:2] == ["llmlab", "pretrain"]
    assert load_config(PretrainConfig, None, words[2:]) == saved  # "copy as CLI command" runs the same config
    assert (saved.max_steps, saved.model.dim, saved.optim.lr, saved.out_dir) == (7, 48, 0.002, "runs/r1")
    reply = editor.post("/configure", data={**form, "action": "save"})
    assert reply.status_code == 400 and reply.json()["field"] == "name" and "exists already" in reply.json()["error"]
    assert editor.post("/configure", data={**form, "action": "save", "replace": "on"}).status_code == 200
    page = editor.get("/configure?start=configs/r1.yaml").text
    assert 'name="f.max_steps" value="7"' in page
    assert editor.get("/configure?verb=evil").status_code == 404
    reply = editor.post("/configure", data={**form, "name": "../x", "action": "save"})
    assert reply.json()["field"] == "name"


def test_model_page_estimates_a_preset_and_explains_a_bad_source(served):
    from llmlab.models.presets import get_preset

    client = served.client("vic")
    page = client.get("/model?source=preset&preset=llama-1m&hardware=a100-80gb").text
    params = get_preset("llama-1m").num_params().total
    assert f"{params:,}" in re.search(r'<td id="params">([^<]*)', page).group(1)
    assert "configure?verb=pretrain&amp;preset=llama-1m" in page
    import argparse

    from llmlab.plan import commands as plan_commands

    parser = argparse.ArgumentParser()
    plan_commands.add_arguments(parser)
    expected = plan_commands.plan(parser.parse_args(["llama-1m", "--hardware", "a100-80gb"]))  # what `llmlab plan` says
    cost = re.search(r'<td id="cost">([^<]*)', page).group(1)
    assert cost.startswith(f"${expected['run']['cost']:,.2f} (")
    page = client.get("/model?source=folder&folder=../../etc").text
    assert 'id="model-error"' in page and "outside the workspace" in page
    assert client.get("/model?source=preset&preset=nope").status_code == 200


# ------------------------------------------------------------------ hostile input


def test_guesses_sent_at_once_are_counted_before_they_are_checked(served):
    from concurrent.futures import ThreadPoolExecutor

    def guess(_):
        client = served.client()
        return client.http.post("/login", data={"name": "ed", "password": "wrong-password"}).status_code

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(guess, range(36)))
    assert codes.count(401) == FREE_FAILURES and codes.count(429) == 36 - FREE_FAILURES


def test_bad_ids_paths_and_offsets_get_a_4xx_never_a_500(with_runs):
    client = with_runs.client("ed")
    a = run_id(client, "a")
    huge = "9" * 30
    for path in (f"/runs/{huge}", f"/jobs/{huge}", f"/jobs/{huge}/log", f"/runs/{huge}/events", "/runs/-1"):
        assert client.get(path).status_code == 422, path
    for query in ("run=²", f"run={huge * 100}", "run=1e3"):
        assert client.get(f"/compare?{query}").status_code == 400, query
    for path in ("/model?source=folder&folder=%00", "/model?source=run&run=a%00b", "/configure?start=%00"):
        reply = client.get(path)
        assert reply.status_code == 200 and "expected a path inside the workspace" in reply.text, path
    for path, data in [("/evaluate", {"checkpoint": "a\0", "tasks": "synth"}),
                       ("/deploy/serve", {"checkpoint": "\0"}),
                       ("/chat/stream", {"checkpoint": "x\0", "messages": "[]"}),
                       ("/data/prepare", {"name": "p", "inputs": "x.jsonl", "tokenizer": "t\0"})]:
        reply = client.post(path, data=data)
        assert reply.status_code == 400, (path, reply.text)
    for last in (huge * 200, "12345678901234567890123", "abc", "999999"):  # not an offset of the file: from its start
        with client.http.stream("GET", f"/runs/{a}/events", headers={"last-event-id": last}) as events:
            body = b"".join(events.iter_bytes())
        assert events.status_code == 200 and body.count(b'"loss"') == 20, last


def test_the_config_form_keeps_every_path_inside_the_workspace(with_runs):
    editor = with_runs.client("ed")
    form = {"verb": "pretrain", "name": "r1", "action": "check"}
    for key, value in [("data", "/etc"), ("data", "../../elsewhere"), ("track.tensorboard_dir", "/tmp/tb"),
                       ("track.mlflow_uri", "file:///tmp/mlruns"), ("ckpt.resume", "~/ckpt"), ("data", "data/../../x")]:
        reply = editor.post("/configure", data={**form, f"f.{key}": value})
        assert reply.status_code == 400 and "outside the workspace" in reply.json()["error"], (key, value)
        assert reply.json()["field"] == f"f.{key}"
    reply = editor.post("/configure", data={**form, "f.track.mlflow_uri": "http://tracking.example:5000"})
    assert reply.status_code == 200  # a tracking server is not a path
    reply = editor.post("/configure", data={**form, "action": "go", "replace": "on"})
    assert reply.status_code == 400 and "action 'go'" in reply.json()["error"]
    reply = editor.post("/configure", data={**form, "name": "nl\n"})
    assert reply.status_code == 400 and reply.json()["field"] == "name"
    reply = editor.post("/configure", files={"f.data": ("x.txt", b"data/tiny")}, data=form)
    assert reply.status_code == 400 and "text fields only" in reply.json()["error"]


def test_the_configure_page_opens_only_saved_configs_and_no_yaml_aliases(with_runs):
    ws = with_runs.studio.workspace
    (ws / "configs").mkdir()
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [{', '.join(['*' + p] * 10)}]"
                                                         for p, c in zip("abcde", "bcdef")]
    (ws / "configs" / "bomb.yaml").write_text("\n".join(levels) + "\ndata: *f\n")
    (ws / "configs" / "ok.yaml").write_text("max_steps: 9\n")
    client = with_runs.client("vic")
    page = client.get("/configure?start=configs/bomb.yaml")
    assert page.status_code == 200 and len(page.text) < 200_000 and "aliases" in page.text
    for start in (".llmlab/studio.sqlite", "runs/a/config.yaml", "configs/../runs/a/config.yaml"):
        page = client.get(f"/configure?start={start}")
        assert page.status_code == 200 and "not a config saved in configs/" in page.text, start
    assert 'name="f.max_steps" value="9"' in client.get("/configure?start=configs/ok.yaml").text
    editor = with_runs.client("ed")  # a saved config still loads after the studio read a database file
    assert editor.post("/configure", data={"verb": "pretrain", "name": "after", "action": "save"}).status_code == 200


def test_commands_take_no_option_from_a_form_and_deleting_a_run_revokes_its_links(with_runs):
    editor, anonymous = with_runs.client("ed"), with_runs.client()
    ws = with_runs.studio.workspace
    for path, data in [("/evaluate", {"checkpoint": "--server=http://127.0.0.1:9/v1", "tasks": "synth"}),
                       ("/deploy/serve", {"checkpoint": "--port", "port": "9003"}),
                       ("/deploy/export", {"checkpoint": "runs/nope", "name": "e"})]:
        reply = editor.post(path, data=data)
        assert reply.status_code == 400 and "not a folder of this workspace" in reply.json()["error"], path
    a = run_id(editor, "a")
    editor.post(f"/runs/{a}/comment", data={"text": "team-only remark"})
    token = re.search(r"share=([^#]+)", editor.post(f"/runs/{a}/share").json()["redirect"]).group(1)
    assert "team-only remark" not in anonymous.get(f"/share/{token}").text  # a link shows the run, not the team
    editor.post(f"/runs/{a}/delete")
    fake_run(ws, "a")  # a new run in the old folder
    assert anonymous.get(f"/share/{token}").status_code == 404


def test_a_folder_the_studio_cannot_write_is_reported_not_a_500(with_runs):
    ws = with_runs.studio.workspace
    (ws / "uploads").write_text("a file where the uploads folder goes")  # as a read-only folder would, as root too
    (ws / "configs").write_text("likewise")
    editor = with_runs.client("ed")
    reply = editor.post("/data/upload", params={"name": "x.jsonl"}, content=b"{}")
    assert reply.status_code == 409 and reply.json()["error"].startswith("uploads")
    reply = editor.post("/configure", data={"verb": "pretrain", "name": "r", "action": "save"})
    assert reply.status_code == 409 and "configs" in reply.json()["error"]
    assert (ws / "uploads").read_text().startswith("a file")
