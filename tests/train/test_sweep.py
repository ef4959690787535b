"""`llmlab scaling fit` on a tiny grid: runs, fit, held-out prediction, plot, reuse and errors."""

from __future__ import annotations

import json

import pytest

from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.config import from_dict
from llmlab.train.sweep import ScalingFitConfig, run


def tiny(corpus_dir, out, **overrides) -> ScalingFitConfig:
    return from_dict(ScalingFitConfig, {"out_dir": str(out), "data": str(corpus_dir), "widths": [16, 32],
                                        "tokens": [2048, 4096, 8192], "seq_len": 32, "batch_size": 4,
                                        "bootstrap": 3, **overrides})


@pytest.mark.slow
def test_sweep_fits_holds_out_the_largest_run_and_reuses_finished_runs(corpus_dir, tmp_path, capsys):
    summary = run(tiny(corpus_dir, tmp_path / "s"))
    runs = summary["runs"]
    assert len(runs) == 6 and all(r["val_loss"] > 0 for r in runs)
    largest = max(runs, key=lambda r: (r["params"], r["tokens"]))
    assert summary["held_out"]["width"] == largest["width"] == 32 and summary["held_out"]["tokens"] == 8192
    assert summary["held_out"]["error"] == pytest.approx(summary["held_out"]["predicted"] / largest["val_loss"] - 1)
    c = summary["constants"]
    assert set(c) == set(summary["stderr"]) == {"E", "A", "B", "alpha", "beta", "size_exponent"}
    assert c["size_exponent"] == pytest.approx(c["beta"] / (c["alpha"] + c["beta"]))
    assert (tmp_path / "s" / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "s" / "fit.json").read_text())["runs"] == runs
    assert "held-out largest run" in capsys.readouterr().out
    # a second call reads the finished runs back instead of training again
    for checkpoints in (tmp_path / "s" / "runs").glob("*/train"):
        (checkpoints / "metrics.jsonl").unlink()
    assert run(tiny(corpus_dir, tmp_path / "s"))["runs"] == runs


@pytest.mark.parametrize("overrides, message", [
    ({"widths": [16]}, "at least two values each"),
    ({"tokens": [2048, 2048]}, "at least two values each"),
    ({"widths": [16, 32], "tokens": [2048, 4096]}, "too few runs"),
    ({"widths": [16, 40], "tokens": [1, 2, 3]}, "multiples of 16"),
])
def test_bad_sweeps_are_refused_before_training(corpus_dir, tmp_path, overrides, message):
    with pytest.raises(LlmlabError, match=message):
        run(tiny(corpus_dir, tmp_path / "bad", **overrides))
    assert not (tmp_path / "bad").exists()


def test_scaling_fit_is_a_verb_with_config_help(capsys):
    with pytest.raises(SystemExit):
        main(["scaling", "fit", "--help"])
    assert "hold_out" in capsys.readouterr().out
