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


@pytest.fixture
def fake_runs(monkeypatch):
    """Runs that take no training (a loss from a known law, written where a real run writes it), fitted
    and plotted at no cost."""
    import llmlab.train.sweep as sweep
    from llmlab.plan.fit import NAMES, LawFit
    from llmlab.plan.scaling import ParametricLaw

    trained = []

    def run_one(cfg, data, vocab, width, tokens, folder):
        params = sweep._model(width, vocab, cfg.seq_len).num_params().non_embedding
        result = {"width": width, "params": params, "tokens": tokens,
                  "val_loss": 1.5 + 300 / params ** 0.4 + 900 / tokens ** 0.3}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps(result))
        trained.append(folder.name)
        return result

    monkeypatch.setattr(sweep, "_run_one", run_one)
    monkeypatch.setattr(sweep, "plot_fit", lambda runs, fit, png: png.write_bytes(b"png"))
    monkeypatch.setattr(sweep, "fit_law", lambda params, *a, **k: LawFit(
        ParametricLaw(1.5, 300.0, 900.0, 0.4, 0.3), dict.fromkeys(NAMES, 0.0), 0.0, len(params)))
    return trained


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change, named", [
    ({"seq_len": 16}, "seq_len=32 there, 16 now"), ({"batch_size": 2}, "batch_size=4 there, 2 now"),
    ({"lr": 1e-3}, "lr=0.003 there, 0.001 now"), ({"seed": 1}, "seed=0 there, 1 now"),
    ({"data": "elsewhere"}, "data="),
])
def test_a_sweep_with_other_settings_is_refused_then_started_over_with_overwrite(corpus_dir, tmp_path, fake_runs,
                                                                                 change, named):
    out = tmp_path / "s"
    run(tiny(corpus_dir, out))
    before = _snapshot(out)
    with pytest.raises(LlmlabError, match=f"holds a sweep made with other settings \\({named}.*--overwrite"):
        run(tiny(corpus_dir, out, **change))
    assert _snapshot(out) == before
    if "data" in change:
        return
    fake_runs.clear()
    (out / "runs" / "w16-t2.05e+03" / "stale").write_text("from the earlier sweep")
    run(tiny(corpus_dir, out, **change), overwrite=True)
    assert len(fake_runs) == 6 and not (out / "runs" / "w16-t2.05e+03" / "stale").exists()


def test_the_same_settings_continue_the_sweep_and_a_missing_record_is_refused(corpus_dir, tmp_path, fake_runs):
    out = tmp_path / "s"
    run(tiny(corpus_dir, out))
    run(tiny(corpus_dir, out, widths=[16, 32, 48], bootstrap=2))  # a wider grid, other fit settings: continues
    assert len(fake_runs) == 6 + 9  # (the real _run_one reads finished runs back; the fake makes each again)
    (out / "config.yaml").unlink()
    with pytest.raises(LlmlabError, match=r"other settings \(no config.yaml records them\)"):
        run(tiny(corpus_dir, out))


def test_damaged_data_is_found_before_the_sweep_writes_anything(corpus_dir, tmp_path, fake_runs):
    data = tmp_path / "data"
    data.mkdir()
    for f in corpus_dir.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    shard = bytearray((data / "val_0000.bin").read_bytes())
    shard[0] ^= 0x01
    (data / "val_0000.bin").write_bytes(bytes(shard))
    with pytest.raises(LlmlabError, match=r"val_0000\.bin: sha256 .* does not match the manifest's"):
        run(tiny(data / "manifest.json", tmp_path / "s"))
    assert not (tmp_path / "s").exists() and not fake_runs


def test_a_signal_stops_the_sweep_and_records_no_result(corpus_dir, tmp_path, monkeypatch):
    import llmlab.train.sweep as sweep

    monkeypatch.setattr(sweep, "pretrain", lambda cfg: {"exit_code": 130, "val_loss": 9.0})
    assert run(tiny(corpus_dir, tmp_path / "s")) == {"exit_code": 130}
    assert not list((tmp_path / "s" / "runs").glob("*/result.json")) and not (tmp_path / "s" / "fit.json").exists()
