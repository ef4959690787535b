"""`llmlab scaling moe` on a tiny budget: two runs of equal active compute, curves, plot, reuse, errors."""

from __future__ import annotations

import json
import math

import pytest

from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.config import from_dict
from llmlab.train.moe_vs_dense import MoEVsDenseConfig, flops_to_reach, run


def tiny(corpus_dir, out, **overrides) -> MoEVsDenseConfig:
    return from_dict(MoEVsDenseConfig, {"out_dir": str(out), "data": str(corpus_dir), "dim": 32, "n_layers": 1,
                                        "hidden_dim": 64, "experts": {"n_experts": 4, "top_k": 2},
                                        "tokens": 2048, "seq_len": 32, "batch_size": 4, "evals": 4,
                                        "eval_batches": 2, **overrides})


def test_the_two_models_pass_a_token_through_as_many_weights():
    dense, moe = MoEVsDenseConfig().models(vocab_size=2048).values()
    assert moe.moe.hidden_dim == dense.hidden_dim // 2 and moe.moe.n_experts == 8
    d, e = dense.num_params(), moe.num_params()
    assert e.active - d.active == dense.n_layers * dense.dim * 8  # the routers only
    assert e.total > 2 * d.total


def test_both_runs_train_plot_and_are_read_back(corpus_dir, tmp_path, capsys):
    summary = run(tiny(corpus_dir, tmp_path / "c"))
    dense, moe = summary["dense"], summary["moe"]
    assert len(dense["curve"]) == len(moe["curve"]) == 4
    assert dense["tokens"] == moe["tokens"] == 16 * 4 * 32
    assert moe["params"] > dense["params"] and moe["flops_per_token"] > dense["flops_per_token"]
    # the curves' compute is steps x tokens per step x FLOPs per token
    assert dense["curve"][-1][0] == 16 * 4 * 32 * dense["flops_per_token"]
    assert summary["loss_gap"] == pytest.approx(dense["val_loss"] - moe["val_loss"])
    assert (tmp_path / "c" / "moe_vs_dense.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "c" / "result.json").read_text()) == summary
    assert "validation loss at equal training compute" in capsys.readouterr().out
    for train in (tmp_path / "c" / "runs").glob("*/train"):  # a second call reads the finished runs back
        (train / "metrics.jsonl").unlink()
    assert run(tiny(corpus_dir, tmp_path / "c")) == summary


def test_another_setting_needs_overwrite_and_foreign_files_are_refused(corpus_dir, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(LlmlabError, match="not a comparison's .*mine.txt"):
        run(tiny(corpus_dir, out))
    (out / "mine.txt").unlink()
    (out / "runs").mkdir()
    (out / "config.yaml").write_text(json.dumps({**vars(tiny(corpus_dir, out)), "experts": {"n_experts": 2}}))
    with pytest.raises(LlmlabError, match="other settings .*experts"):
        run(tiny(corpus_dir, out))


@pytest.mark.parametrize("overrides, message", [
    ({"dim": 48}, "multiple of 32"),
    ({"hidden_dim": 63}, "split into top_k=2"),
    ({"experts": {"n_experts": 1, "top_k": 1, "normalize": "all"}}, "n_experts must be >= 2"),
    ({"tokens": 100}, "too few for 4 evaluations"),
])
def test_bad_settings_are_refused_before_anything_is_written(corpus_dir, tmp_path, overrides, message):
    with pytest.raises((LlmlabError, ValueError), match=message):
        run(tiny(corpus_dir, tmp_path / "bad", **overrides))
    assert not (tmp_path / "bad").exists()


def test_flops_to_reach_interpolates_in_log_compute():
    curve = [[1e6, 5.0], [1e8, 3.0], [1e10, 2.0]]
    assert flops_to_reach(curve, 3.0) == pytest.approx(1e8)
    assert flops_to_reach(curve, 2.5) == pytest.approx(1e9)  # halfway between 1e8 and 1e10 in log
    assert flops_to_reach(curve, 6.0) == 1e6 and flops_to_reach(curve, 1.0) is None
    assert math.isclose(flops_to_reach(curve, 4.0), 1e7)


def test_scaling_moe_is_a_verb_with_config_help(capsys):
    with pytest.raises(SystemExit):
        main(["scaling", "moe", "--help"])
    assert "experts" in capsys.readouterr().out


def test_a_signal_stops_the_comparison_and_records_no_result(corpus_dir, tmp_path, monkeypatch):
    import llmlab.train.moe_vs_dense as module

    monkeypatch.setattr(module, "pretrain", lambda cfg: {"exit_code": 143, "val_loss": 9.0})
    code = main(["scaling", "moe", f"out_dir={tmp_path / 'c'}", f"data={corpus_dir}", "dim=32", "n_layers=1",
                 "hidden_dim=64", "tokens=2048", "seq_len=32", "batch_size=4", "evals=4", "eval_batches=2"])
    assert code == 143  # as the shell reports a SIGTERM
    assert not (tmp_path / "c" / "runs" / "dense" / "result.json").exists()
    assert not (tmp_path / "c" / "result.json").exists()
