"""Every writer refuses an existing non-empty target without --overwrite and leaves it intact, refuses a
target inside or containing its input, and with --overwrite leaves a user's unrelated files alone;
the debris of killed writers is cleaned on the next run; resuming past a damaged checkpoint falls
back to the newest intact one."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hardening.runner import needle_problems, run_cli
from tests.hardening.workspace import difference, snapshot, substitute


@dataclass
class Writer:
    command: str  # llmlab's arguments; {out} is the target
    folder: bool = True  # writes a folder (else one file)
    inside: str = ""  # a target inside (or equal to) its input ("" when it reads none)
    contains: str = ""  # a target that contains its input ("" when none can)


WRITERS = {
    "convert-hf": Writer("convert {run_ckpt} --to hf --out {out}", inside="{run_ckpt}/hf",
                         contains="{run}/checkpoints"),
    "convert-llmlab": Writer("convert {hf} --to llmlab --out {out}", inside="{hf}/ours", contains="{ws}"),
    "convert-gguf": Writer("convert {ckpt} --to gguf --outtype f32 --out {out}", folder=False,
                           inside="{ckpt}/model.gguf"),
    "data-prepare": Writer("data prepare inputs=[{corpus}] tokenizer={tok} out_dir={out}", inside="{corpus}/data",
                           contains="{ws}"),
    "tokenizer-train": Writer("tokenizer train inputs=[{corpus}] vocab_size=300 out_dir={out}", inside="{corpus}/tok",
                              contains="{ws}"),
    "data-synth": Writer("data synth out_dir={out} train=10 val=2 test=2 tasks=[reverse]"),
    "data-tasks": Writer("data tasks out_dir={out} train=10 val=2 test=2"),
    "pretrain": Writer("pretrain {pt} out_dir={out}", inside="{data}/run", contains="{ws}"),
    "finetune": Writer("finetune {ft} out_dir={out}", inside="{ckpt}/ft", contains="{synth}"),
    "plan-write-config": Writer("plan {pt} --write-config {out}", folder=False, inside="{pt}"),
    "demo": Writer("demo out_dir={out} minutes=0.002 vocab_size=300 dim=24 n_layers=1 seq_len=16 batch_size=2"),
    "scaling-fit": Writer("scaling fit {sf} out_dir={out}", inside="{data}/sweep", contains="{ws}"),
    "scaling-moe": Writer("scaling moe {sm} out_dir={out}", inside="{data}/moe", contains="{ws}"),
    "align": Writer("align {al} out_dir={out}", inside="{ckpt}/al", contains="{pref}"),
    "data-distill": Writer("data distill teacher={ckpt} instructions=1 rounds=1 prompts_per_round=1 "
                           "max_new_tokens=8 out_dir={out}", inside="{ckpt}/distill", contains="{ws}"),
}


def _run(ws, monkeypatch, command: str, out: Path | str, overwrite: bool = False):
    monkeypatch.chdir(ws.root)
    args = [substitute(a, {**ws.values, "out": str(out)}) for a in shlex.split(command)]
    return run_cli(args + (["--overwrite"] if overwrite else []), seconds=120)  # some do real work


def _user_target(tmp_path: Path, writer: Writer) -> tuple[Path, Path]:
    """(target, the user's file): a folder holding the user's file, or an existing file beside it."""
    folder = tmp_path / "target"
    folder.mkdir()
    (folder / "notes.txt").write_text("a user's notes, not llmlab's\n")
    if writer.folder:
        return folder, folder / "notes.txt"
    target = folder / "model.out"
    target.write_text("a user's file where the output would go\n")
    return target, folder / "notes.txt"


@pytest.mark.parametrize("name", WRITERS)
def test_an_existing_target_is_refused_without_overwrite(hardening_workspace, monkeypatch, tmp_path, name):
    writer = WRITERS[name]
    target, _ = _user_target(tmp_path, writer)
    before = snapshot(tmp_path)
    code, stdout, stderr = _run(hardening_workspace, monkeypatch, writer.command, target)
    changes = difference(before, snapshot(tmp_path)) + hardening_workspace.check_and_restore()
    assert code == 1 and not needle_problems("--overwrite", stderr), (code, stderr[-500:])
    assert "Traceback" not in stdout + stderr
    assert changes == []


@pytest.mark.parametrize("name, relation", [(n, r) for r in ("inside", "contains") for n, w in WRITERS.items()
                                             if getattr(w, r)])
def test_a_target_inside_or_containing_its_input_is_refused(hardening_workspace, monkeypatch, name, relation):
    writer = WRITERS[name]
    target = substitute(getattr(writer, relation), hardening_workspace.values)
    code, stdout, stderr = _run(hardening_workspace, monkeypatch, writer.command, target, overwrite=True)
    changes = hardening_workspace.check_and_restore()
    assert code == 1 and stderr.startswith("error:") and target in stderr, (code, stderr[-500:])
    assert "Traceback" not in stdout + stderr and "internal error" not in stderr
    assert changes == []


@pytest.mark.parametrize("name", WRITERS)
def test_overwrite_leaves_the_users_files_alone(hardening_workspace, monkeypatch, tmp_path, name):
    writer = WRITERS[name]
    target, users = _user_target(tmp_path, writer)
    kept = users.read_bytes()
    code, stdout, stderr = _run(hardening_workspace, monkeypatch, writer.command, target, overwrite=True)
    changes = hardening_workspace.check_and_restore()
    assert code == 0, stderr[-1000:]
    assert users.read_bytes() == kept
    assert target.exists() and (not writer.folder or len(list(target.iterdir())) > 1)
    assert changes == []


# --------------------------------------------------------------------------- a killed writer's debris

DEBRIS_WRITERS = {
    "data-prepare": Writer("data prepare inputs=[{corpus}] tokenizer={tok} out_dir={out}"),
    "data-synth": Writer("data synth out_dir={out} train=10 val=2 test=2 tasks=[reverse]"),
    "convert-hf": Writer("convert {ckpt} --to hf --out {out}"),
    "convert-gguf": Writer("convert {ckpt} --to gguf --outtype f32 --out {out}", folder=False),
}


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("name", DEBRIS_WRITERS)
def test_a_killed_writers_temporaries_are_cleaned_on_the_next_run(hardening_workspace, monkeypatch, tmp_path, name):
    writer = DEBRIS_WRITERS[name]
    target = tmp_path / ("data" if writer.folder else "model.gguf")
    dead, alive = _dead_pid(), os.getpid()
    debris = [tmp_path / f".{target.name}.{dead}.k1ll3d00.tmp", tmp_path / f".{target.name}.0ld5ty1e.tmp"]
    live = tmp_path / f".{target.name}.{alive}.l1ve0000.tmp"
    for path in (*debris, live):
        if writer.folder:
            path.mkdir()
            (path / "train_0000.bin").write_bytes(b"\x01\x00" * 100)  # a partial shard
        else:
            path.write_bytes(b"GGUF partial")
    users = [tmp_path / f".{target.name}.notes", tmp_path / "other.txt"]  # not llmlab's: never removed
    for path in users:
        path.write_text("the user's\n")
    code, stdout, stderr = _run(hardening_workspace, monkeypatch, writer.command, target)
    changes = hardening_workspace.check_and_restore()
    assert code == 0, stderr[-1000:]
    assert [p.name for p in debris if p.exists()] == []
    assert live.exists() and all(p.read_text() == "the user's\n" for p in users)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p != live)
    assert leftovers == [] and changes == []


# --------------------------------------------------------------------------- resuming past damage

DAMAGE = {
    "truncated-weights": ("model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:64])),
    "garbage-state": ("state.json", lambda f: f.write_text("{garbage")),
    "empty-optimizer": ("optimizer.safetensors", lambda f: f.write_bytes(b"")),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_falls_back_to_the_newest_intact_checkpoint(hardening_workspace, monkeypatch, tmp_path, damage):
    ws = hardening_workspace.values
    run = tmp_path / "run"
    shutil.copytree(ws["run"], run)
    name, spoil = DAMAGE[damage]
    spoil(run / "checkpoints" / "step-00000002" / name)
    code, stdout, stderr = _run(hardening_workspace, monkeypatch, "pretrain {run_config} out_dir={out} "
                                "ckpt.resume=auto max_steps=3", run)
    hardening_workspace.check_and_restore()
    assert code == 0, stderr[-1000:]
    assert "step-00000002" in stdout + stderr  # it says which checkpoint it passed over
    assert "resumed from" in stdout and "step-00000001" in stdout.split("resumed from", 1)[1].splitlines()[0]
    assert "Traceback" not in stdout + stderr
