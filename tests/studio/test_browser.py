"""The studio in a real browser: Playwright drives Debian's chromium against `llmlab studio` run as a
child process. One walk through the workflow, as a user clicks it: log in, upload a corpus, prepare
it (a new tokenizer), launch a run and watch its loss chart grow without a reload, in two browsers
that end up with the same points, stop it, chat with its checkpoint, and compare it with a second run.

Every page visited is saved as a full-page screenshot in the test's tmp_path (NN-name.png), for a
person to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.studio.conftest import PASSWORDS, StudioProcess, corpus_lines, make_workspace

CHROMIUM = "/usr/bin/chromium"
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None
if sync_playwright is None or not shutil.which(CHROMIUM):
    pytest.skip("install Debian's chromium (apt-get install chromium) and the dev extras to run the studio's browser "
                "tests", allow_module_level=True)

pytestmark = pytest.mark.slow
WAIT_MS = 10_000  # for a page or an element
JOB_MS = 60_000  # for a job, a run or a reply
# a model small enough that CPU training is quick to start and fast to step; max_steps far beyond what is watched
MODEL = {"model.dim": "32", "model.n_layers": "1", "model.n_heads": "2", "model.n_kv_heads": "2",
         "model.head_dim": "16", "model.hidden_dim": "64", "model.max_seq_len": "64", "batch_size": "4",
         "log_every": "1", "eval.every": "20", "eval.batches": "2"}
LOG_AT_END = "() => { const l = document.getElementById('log'); return l.scrollTop + l.clientHeight >= " \
             "l.scrollHeight - 4; }"  # the log box shows its newest lines


class Shots:
    """Full-page screenshots, numbered in the order the pages were visited."""

    def __init__(self, folder: Path):
        self.folder, self.n = folder, 0

    def __call__(self, page, name: str) -> None:
        self.n += 1
        page.screenshot(path=self.folder / f"{self.n:02d}-{name}.png", full_page=True)


def log_in(browser, url: str, user: str, shots: Shots):
    """A new browser context (its own cookies) logged in through the login form; its first page."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto(url + "/")
    expect(page).to_have_url(re.compile(r"/login"))
    page.fill("input[name=name]", user)
    page.fill("input[name=password]", PASSWORDS[user])
    shots(page, f"login-{user}")
    page.click("form.login button[type=submit]")
    expect(page.locator("header .who span")).to_contain_text(f"{user} (")
    return page


def points(page) -> int:
    return int(page.locator("#live").get_attribute("data-points") or 0)


def loss_steps(page) -> list:
    """The x values of the run page's training-loss trace, as plotly holds them."""
    return page.evaluate("() => document.getElementById('chart-loss').data[0].x")


def configure_run(page, url: str, shots: Shots, name: str, data: str, **values: str) -> int:
    """Fill the Configure page for a pretraining run, launch it; the job's id (the page is its job page)."""
    page.goto(f"{url}/configure?verb=pretrain")
    page.fill("#run-name", name)
    page.fill('[name="f.data"]', data)
    for key, value in {**MODEL, **values}.items():
        field = page.locator(f'[name="f.{key}"]')
        section = field.locator("xpath=ancestor::details")
        if section.get_attribute("open") is None:  # a closed section, as a user opens it
            section.locator("summary").click()
        field.fill(value)
    page.click("#check")
    expect(page.locator("#command")).to_contain_text(f"out_dir=runs/{name}")
    shots(page, f"configure-{name}")
    page.click("#launch")
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    return int(page.url.rsplit("/", 1)[1])


def end_jobs(workspace: Path) -> None:
    """Kill the jobs the studio started that still run (each leads its own process group)."""
    from llmlab.studio.store import Store

    store = Store(workspace)
    try:
        for job in store.jobs("running"):
            if job["pid"]:
                try:
                    os.killpg(job["pid"], signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    finally:
        store.close()


def test_the_workflow_in_a_browser(tmp_path):
    workspace = make_workspace(tmp_path / "ws")
    shots = Shots(tmp_path)
    expect.set_options(timeout=JOB_MS)
    studio = StudioProcess(workspace)
    url = studio.url
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
            try:
                walk(browser, url, workspace, shots)
            except BaseException:  # what each open page showed when the test failed
                for i, context in enumerate(browser.contexts):
                    for j, page in enumerate(context.pages):
                        page.screenshot(path=tmp_path / f"failed-{i}-{j}.png", full_page=True)
                raise
            finally:
                browser.close()
    finally:
        studio.kill(signal.SIGTERM)
        end_jobs(workspace)


def walk(browser, url: str, workspace: Path, shots: Shots) -> None:
    errors: list[str] = []
    page = log_in(browser, url, "ed", shots)
    page.on("pageerror", lambda e: errors.append(str(e)))
    expect(page.locator("h1")).to_have_text("Runs")
    shots(page, "runs-empty")

    # ---------------------------------------------------------------- upload and prepare
    page.click("header nav a[href='/data']")
    shots(page, "data-empty")
    page.set_input_files("#upload-form input[type=file]", files=[
        {"name": "corpus.jsonl", "mimeType": "application/json", "buffer": corpus_lines().encode()}])
    page.click("#upload-form button")
    upload = page.locator("table.uploads tr", has_text="corpus.jsonl")
    expect(upload.locator("td").nth(1)).to_have_text("text")  # the kind, from the first record's keys
    expect(page.locator("#flash")).to_contain_text("uploaded corpus.jsonl")
    assert (workspace / "uploads" / "corpus.jsonl").read_text() == corpus_lines()
    shots(page, "data-uploaded")

    form = page.locator("#prepare-form")
    form.locator("select[name=inputs]").select_option("corpus.jsonl")
    form.locator("input[name=name]").fill("web")
    form.locator("select[name=tokenizer]").select_option("new")
    form.locator("input[name=vocab_size]").fill("300")
    form.locator("input[name=val_frac]").fill("0.1")
    form.locator("button").click()
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    expect(page.locator("#job-status")).to_have_text("finished")  # the page reloads itself when the job ends
    expect(page.locator("#log")).to_contain_text("data -> data/web")
    shots(page, "job-prepare")
    assert (workspace / "data" / "web" / "manifest.json").is_file()
    page.click("header nav a[href='/data']")
    report = page.locator("section.report[data-name=web]")
    expect(report).to_contain_text("Vocabulary 300")
    shots(page, "data-prepared")

    # ---------------------------------------------------------------- a run, watched live in two browsers
    configure_run(page, url, shots, "live", "data/web", max_steps="5000")
    run_link = page.locator("main a[href^='/runs/']")
    expect(run_link).to_be_visible()  # once the run registers, without a reload by hand
    expect(page.locator("#job-status")).to_have_text("running")
    shots(page, "job-live")
    run_link.click()
    page.wait_for_url(re.compile(r"/runs/\d+$"))
    run_url = page.url
    expect(page.locator("#status")).to_have_text("running")
    page.wait_for_function("() => Number(document.getElementById('live').dataset.points) > 0")
    page.evaluate("() => { window.sameDocument = true; }")  # gone if the page reloads
    first, first_steps = points(page), len(loss_steps(page))
    time.sleep(3)
    second, second_steps = points(page), len(loss_steps(page))
    assert second > first > 0 and second_steps > first_steps, (first, second, first_steps, second_steps)
    assert page.evaluate("() => window.sameDocument === true"), "the run page reloaded"
    expect(page.locator("#log")).to_contain_text("/5000")
    page.wait_for_function(LOG_AT_END)  # the log follows the newest lines
    shots(page, "run-live")

    viewer = log_in(browser, url, "vic", shots)  # a second browser, a viewer: no Stop button, so it never reloads
    viewer.on("pageerror", lambda e: errors.append(str(e)))
    viewer.goto(run_url)
    viewer.wait_for_function("() => Number(document.getElementById('live').dataset.points) > 0")
    expect(viewer.locator("#stop")).to_have_count(0)
    a, b = loss_steps(page), loss_steps(viewer)
    shorter, longer = sorted((a, b), key=len)
    assert longer[:len(shorter)] == shorter  # the same points, one browser a little ahead
    shots(viewer, "run-live-viewer")

    page.click("#stop")
    expect(page.locator("#status")).to_have_text("stopped")
    expect(page.locator("#resume")).to_be_visible()  # the page reloaded once the run ended
    expect(viewer.locator("#status")).to_have_text("stopped")
    run_dir = workspace / "runs" / "live"
    assert any((run_dir / "checkpoints").glob("step-*")), "no checkpoint saved on SIGTERM"
    trained = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    for p in (page, viewer):  # both end with every point of the run, in order
        p.wait_for_function(f"() => Number(document.getElementById('live').dataset.points) === {len(trained)}")
    assert loss_steps(page) == loss_steps(viewer) == trained
    expect(page.locator("#log")).to_contain_text("checkpoint")
    page.wait_for_function(LOG_AT_END)  # the reloaded page shows the log's end: the checkpoint saved on stopping
    shots(page, "run-stopped")
    shots(viewer, "run-stopped-viewer")
    viewer.context.close()

    # ---------------------------------------------------------------- chat with its checkpoint
    page.click("header nav a[href='/chat']")
    page.select_option("select[name=checkpoint]", "runs/live")
    page.fill("input[name=temperature]", "1")  # sampled: greedy decoding of a tiny model may end at once
    page.fill("input[name=seed]", "0")
    page.fill("input[name=max_new_tokens]", "12")
    page.fill("textarea[name=message]", "the cat sat")
    with page.expect_response("**/chat/stream") as reply:
        page.click("#send")
    assert reply.value.headers["content-type"].startswith("text/event-stream")
    bubble = page.locator(".message.assistant")
    expect(bubble).to_have_attribute("data-tokens", re.compile(r"^[1-9]\d*$"))
    expect(bubble).not_to_have_class(re.compile(r"\berror\b"))
    if not bubble.inner_text().strip():  # only a reply that ended at its first token has no text
        assert bubble.get_attribute("data-tokens") == "1" and "empty" in bubble.get_attribute("class")
    expect(page.locator(".message.user")).to_have_text("the cat sat")
    shots(page, "chat")

    # ---------------------------------------------------------------- a second run, compared with the first
    configure_run(page, url, shots, "short", "data/web", max_steps="20", **{"eval.every": "10"})
    expect(page.locator("#job-status")).to_have_text("finished")
    shots(page, "job-short")
    page.click("header nav a[href='/']")
    page.check("input[aria-label='compare live']")
    page.check("input[aria-label='compare short']")
    shots(page, "runs-checked")
    page.click("#compare")
    page.wait_for_url(re.compile(r"/compare\?run=\d+&run=\d+$"))
    expect(page.locator("h1")).to_have_text("Compare 2 runs")
    page.wait_for_function("() => (document.getElementById('compare-loss').data || []).length === 2")
    curves = "(id) => Object.fromEntries(document.getElementById(id).data.map((t) => [t.name, t.x.length]))"
    assert page.evaluate(f"({curves})('compare-loss')") == {"live": len(trained), "short": 20}
    assert all(page.evaluate(f"({curves})('compare-val')").values())
    names = page.locator("table.diff thead th").all_inner_texts()[1:]
    row = page.locator("table.diff tbody tr", has=page.locator("td", has_text=re.compile(r"^max_steps$")))
    assert dict(zip(names, row.locator("td").all_inner_texts()[1:])) == {"live": "5000", "short": "20"}
    shots(page, "compare")
    assert not errors, errors
