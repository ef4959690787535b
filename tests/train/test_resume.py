"""Resuming a pretraining run when its checkpoints are damaged or its settings have changed: damage is
found before loading, resume=auto falls back to the newest intact checkpoint and says so, and a
changed batch shape is refused unless asked for."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from llmlab.common import LlmlabError
from llmlab.models.io import CheckpointError
from llmlab.train.checkpoint import list_checkpoints, verify_checkpoint
from llmlab.train.pretrain import run
from tests.train.test_pretrain import _cfg


@pytest.fixture(scope="module")
def finished(corpus_dir, tmp_path_factory):
    """A run of 6 steps with checkpoints at steps 2, 4 and 6, to copy and damage."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(_cfg(corpus_dir, out, max_steps=6, **{"ckpt.every": 2}))
    return out


def _copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run", tmp_path / "run" / "checkpoints"


def _truncate(file):
    file.write_bytes(file.read_bytes()[:-100])


def _flip(file, at=-50):
    data = bytearray(file.read_bytes())
    data[at] ^= 0x01
    file.write_bytes(bytes(data))


def _edit_state(file):  # still valid JSON, one number changed
    state = json.loads(file.read_text())
    state["tokens"] += 1
    file.write_text(json.dumps(state))


DAMAGE = {
    "model truncated": ("model.safetensors", _truncate),
    "model bit flip": ("model.safetensors", _flip),
    "optimizer bit flip": ("optimizer.safetensors", _flip),
    "rng truncated": ("rng.safetensors", _truncate),
    "state not JSON": ("state.json", lambda f: f.write_text('{"step": 6,')),
    "state edited": ("state.json", _edit_state),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(corpus_dir, finished, tmp_path, capsys, name):
    out, ckpts = _copy(finished, tmp_path)
    file, damage = DAMAGE[name]
    damage(ckpts / "step-00000006" / file)
    with pytest.raises(CheckpointError, match=f"step-00000006/{file}: "):
        verify_checkpoint(ckpts / "step-00000006")
    result = run(_cfg(corpus_dir, out, max_steps=6, **{"ckpt.every": 2, "ckpt.resume": "auto"}))
    err = capsys.readouterr().err
    assert f"warning: {ckpts / 'step-00000006' / file}: " in err and "resuming from step-00000004" in err
    assert len(err.strip().splitlines()) == 1
    assert result["step"] == 6 and (ckpts / "step-00000006.damaged").is_dir()
    # the resumed run remade step 6 exactly as the run that saved it first
    original = load_file(finished / "checkpoints" / "step-00000006" / "model.safetensors")
    remade = load_file(ckpts / "step-00000006" / "model.safetensors")
    assert all((original[k] == remade[k]).all() for k in original)


def test_no_intact_checkpoint_is_an_error_naming_the_newest_damage(corpus_dir, finished, tmp_path):
    out, ckpts = _copy(finished, tmp_path)
    for step in (2, 4, 6):
        _flip(ckpts / f"step-{step:08d}" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*step-00000006/model.safetensors: damaged"):
        run(_cfg(corpus_dir, out, max_steps=8, **{"ckpt.resume": "auto"}))


def test_resume_from_a_damaged_path_names_the_file(corpus_dir, finished, tmp_path):
    out, ckpts = _copy(finished, tmp_path)
    _flip(ckpts / "step-00000006" / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match=r"ckpt.resume: .*step-00000006/optimizer.safetensors: damaged"):
        run(_cfg(corpus_dir, out, max_steps=8, **{"ckpt.resume": str(ckpts / "step-00000006")}))


def test_checkpoints_without_checksums_are_checked_by_opening_their_files(finished, tmp_path):
    _, ckpts = _copy(finished, tmp_path)
    state_file = ckpts / "step-00000006" / "state.json"
    state = json.loads(state_file.read_text())
    del state["files"], state["sha256"]  # as written before checksums were recorded
    state_file.write_text(json.dumps(state))
    verify_checkpoint(ckpts / "step-00000006")
    _truncate(ckpts / "step-00000006" / "model.safetensors")
    with pytest.raises(CheckpointError, match="step-00000006/model.safetensors: damaged"):
        verify_checkpoint(ckpts / "step-00000006")


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 8}, "batch_size=8, but the checkpoint .* was trained with 4"),
    ({"seq_len": 16}, "seq_len=16, but the checkpoint .* was trained with 32"),
    ({"grad_accum": 2}, r"2 micro-batches per step \(grad_accum x processes\), but the checkpoint .* was trained "
                        "with 1"),
])
def test_a_changed_batch_shape_needs_a_flag(corpus_dir, finished, tmp_path, change, message):
    out, _ = _copy(finished, tmp_path)
    with pytest.raises(LlmlabError, match=message + ".*ckpt.allow_batch_change=true"):
        run(_cfg(corpus_dir, out, max_steps=8, **change, **{"ckpt.resume": "auto"}))
    result = run(_cfg(corpus_dir, out, max_steps=8, **change, **{"ckpt.resume": "auto",
                                                                 "ckpt.allow_batch_change": True}))
    assert result["step"] == 8


def test_resuming_an_older_checkpoint_under_newer_ones_is_refused(corpus_dir, finished, tmp_path):
    out, ckpts = _copy(finished, tmp_path)
    with pytest.raises(LlmlabError, match=r"holds checkpoints past its step 2 \(step-00000004, step-00000006\)"):
        run(_cfg(corpus_dir, out, max_steps=8, **{"ckpt.resume": str(ckpts / "step-00000002")}))


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(corpus_dir, finished, tmp_path):
    out, ckpts = _copy(finished, tmp_path)
    shutil.rmtree(ckpts / "step-00000006")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    run(_cfg(corpus_dir, out, max_steps=6, **{"ckpt.resume": "auto"}))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6 and steps.count(6) == 2  # the step's loss and its evaluation, once each


def test_every_checkpoint_records_its_settings_and_checksums(finished):
    last = list_checkpoints(finished / "checkpoints")[-1]
    state = json.loads((last / "state.json").read_text())
    model = state["settings"].pop("model")
    assert model == json.loads((last / "config.json").read_text())["llmlab"]  # the model the checkpoint holds
    assert state["settings"] == {"batch_size": 4, "seq_len": 32, "micro_batches": 1, "optim.name": "adamw",
                                 "objective": "clm"}
    assert set(state["files"]) >= {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "config.json"}


def test_another_optimizer_cannot_read_the_saved_state(corpus_dir, finished, tmp_path):
    out, _ = _copy(finished, tmp_path)
    with pytest.raises(LlmlabError, match=r"optim.name=adamw8bit, but the checkpoint .* was trained with adamw; "
                                          r"set it back$"):
        run(_cfg(corpus_dir, out, max_steps=8, **{"optim.name": "adamw8bit", "ckpt.resume": "auto",
                                                  "ckpt.allow_batch_change": True}))


def test_another_number_of_micro_batches_is_named(corpus_dir, finished):
    from llmlab.train.loop import resume_run, run_settings

    cfg = _cfg(corpus_dir, finished, **{"ckpt.resume": "auto"})
    with pytest.raises(LlmlabError, match=r"^2 micro-batches per step \(grad_accum x processes\), but the checkpoint "
                                          r".* was trained with 1; set it back, or pass ckpt.allow_batch_change=true"):
        resume_run(cfg, finished / "checkpoints", 0, None, None, run_settings(cfg, 2))


def test_a_resume_path_that_cannot_be_read_is_named(corpus_dir, finished, tmp_path):
    out, _ = _copy(finished, tmp_path)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(LlmlabError, match=r"ckpt.resume=.*loop: Too many levels of symbolic links"):
        run(_cfg(corpus_dir, out, max_steps=8, **{"ckpt.resume": str(loop)}))
