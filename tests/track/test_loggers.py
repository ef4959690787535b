"""Metric loggers: a tiny pretraining run with track.loggers=[tensorboard,mlflow] leaves in TensorBoard's
event files and in its MLflow run exactly what metrics.jsonl holds, and the MLflow run's params and
status say how it ran; a logger that fails never stops the run, and one that cannot start stops it first."""

from __future__ import annotations

import shutil
import sys

import pytest
import yaml

from llmlab.common import LlmlabError
from llmlab.config import ConfigError, load_config
from llmlab.track import TrackConfig
from llmlab.track.loggers import MLFLOW_STATUS, TensorBoardLogger
from llmlab.train import core
from llmlab.train.pretrain import PretrainConfig, run
from tests.train.test_finetune import _cfg as _finetune_cfg
from tests.train.test_pretrain import _cfg, _metrics

BOTH = {"track.loggers": ["tensorboard", "mlflow"]}


@pytest.fixture(autouse=True)
def mlflow_env(monkeypatch):
    """MLflow's default store is the run's own folder, whatever the environment says; no telemetry."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def _expected(out) -> dict[str, list[tuple[int, float]]]:
    """Each numeric field of metrics.jsonl: its (step, value) pairs, in order."""
    series: dict[str, list] = {}
    for line in _metrics(out):
        for key, value in line.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((line["step"], value))
    return series


def _tensorboard(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _mlflow_runs(out):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("llmlab")
    return client, client.search_runs([experiment.experiment_id])


def _leaf_keys(config: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in config.items():
        keys |= _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key}
    return keys


def test_tensorboard_and_mlflow_hold_what_metrics_jsonl_holds(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pt"
    run(_cfg(corpus_dir, out, max_steps=8, **BOTH))
    expected = _expected(out)
    assert {"loss", "lr", "tokens", "tokens_per_s", "grad_norm", "val_loss", "val_ppl"} <= expected.keys()
    assert [s for s, _ in expected["loss"]] == list(range(1, 9)) and [s for s, _ in expected["val_loss"]] == [4, 8]

    scalars = _tensorboard(out / "tensorboard")
    assert scalars.keys() == expected.keys()
    for key, series in expected.items():  # event files hold float32
        assert [s for s, _ in scalars[key]] == [s for s, _ in series], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in series], rel=1e-6), key

    client, (mlflow_run,) = _mlflow_runs(out)
    run_id = mlflow_run.info.run_id
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "pt"
    assert mlflow_run.data.tags["llmlab.run_dir"] == str(out.resolve())
    assert mlflow_run.data.tags["llmlab.kind"] == "pretrain"
    for key, series in expected.items():  # exactly: MLflow keeps doubles
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == series, key

    params = mlflow_run.data.params
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert params.keys() == _leaf_keys(config)
    assert (params["max_steps"], params["optim.lr"], params["model.family"]) == ("8", "0.003", "llama")
    assert params["track.loggers"] == '["tensorboard", "mlflow"]' and params["system.autocast"] == "none"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pt"]  # nothing written outside the run


def test_a_resumed_run_continues_its_mlflow_run_and_hides_the_stale_tensorboard_steps(corpus_dir, tmp_path):
    out = tmp_path / "pt"
    run(_cfg(corpus_dir, out, max_steps=8, **BOTH))
    shutil.rmtree(out / "checkpoints" / "step-00000008")  # as if killed after step 8's line, before its checkpoint
    run(_cfg(corpus_dir, out, max_steps=8, **{**BOTH, "ckpt.resume": "auto"}))
    expected = _expected(out)
    assert [s for s, _ in _tensorboard(out / "tensorboard")["loss"]] == list(range(1, 9))  # steps 5-8 once
    client, (mlflow_run,) = _mlflow_runs(out)  # one MLflow run, finished again
    assert mlflow_run.info.status == "FINISHED"
    history = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert {(m.step, m.value) for m in history} == set(expected["loss"])
    assert mlflow_run.data.params["ckpt.resume"] == "none"  # the params of the run's start stay


def test_fine_tuning_logs_its_lines_too_from_the_exact_match_before_the_first_step(base, synth_dir, tmp_path):
    from llmlab.train.finetune import run as finetune

    out = tmp_path / "ft"
    finetune(_finetune_cfg(base, synth_dir, out, max_steps=4, **{"track.loggers": ["tensorboard"]}))
    expected = _expected(out)
    assert expected["exact_match"][0][0] == 0 and "exact_match/add" in expected
    scalars = _tensorboard(out / "tensorboard")
    assert scalars.keys() == expected.keys()
    for key, series in expected.items():
        assert [s for s, _ in scalars[key]] == [s for s, _ in series], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in series], rel=1e-6), key


@pytest.mark.parametrize("end", ["failed", "stopped"])
def test_the_mlflow_run_ends_as_the_run_ends(end, corpus_dir, tmp_path, monkeypatch):
    if end == "failed":
        def fail(self, done, record, **kwargs):
            raise LlmlabError("a step that fails")

        monkeypatch.setattr(core.Run, "after_step", fail)
        with pytest.raises(LlmlabError, match="a step that fails"):
            run(_cfg(corpus_dir, tmp_path / "pt", max_steps=4, **{"track.loggers": ["mlflow"]}))
    else:
        monkeypatch.setattr(core, "stop_reason", lambda *args: "signal:SIGTERM")
        assert run(_cfg(corpus_dir, tmp_path / "pt", max_steps=4, **{"track.loggers": ["mlflow"]}))["step"] == 1
    _, (mlflow_run,) = _mlflow_runs(tmp_path / "pt")
    assert mlflow_run.info.status == MLFLOW_STATUS[end] == {"failed": "FAILED", "stopped": "KILLED"}[end]


def test_a_logger_that_fails_mid_run_warns_once_and_the_run_goes_on(corpus_dir, tmp_path, monkeypatch, capsys):
    def broken(self, step, values):
        raise OSError("No space left on device")

    monkeypatch.setattr(TensorBoardLogger, "log", broken)
    out = tmp_path / "pt"
    assert run(_cfg(corpus_dir, out, max_steps=4, **BOTH))["step"] == 4
    err = capsys.readouterr().err
    assert err.count("tensorboard logging stopped") == 1 and "No space left on device" in err
    client, (mlflow_run,) = _mlflow_runs(out)  # the other logger carries on
    assert len(client.get_metric_history(mlflow_run.info.run_id, "loss")) == 4


def test_an_unknown_logger_is_a_config_error_naming_the_field_and_the_loggers():
    with pytest.raises(ConfigError, match=r"command line: track\.loggers\[1\]: expected one of 'tensorboard', "
                                          r"'mlflow', got 'tensorbord' .*did you mean 'tensorboard'"):
        load_config(PretrainConfig, None, ["track.loggers=[mlflow,tensorbord]"])
    with pytest.raises(ValueError, match="loggers: unknown logger 'wandb'; the loggers are tensorboard, mlflow"):
        TrackConfig(loggers=["wandb"])


@pytest.mark.parametrize("name, module", [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_package_stops_the_run_before_it_starts(name, module, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package imports
    with pytest.raises(LlmlabError, match=rf"track.loggers names {name}, which needs the .* package .*"
                                          r"pip install 'llmlab\[track\]'"):
        run(_cfg(corpus_dir, tmp_path / "pt", max_steps=2, **{"track.loggers": [name]}))
    assert not (tmp_path / "pt" / "metrics.jsonl").exists()


def test_an_mlflow_store_that_cannot_start_stops_the_run_with_its_reason(corpus_dir, tmp_path):
    with pytest.raises(LlmlabError, match="track.loggers: mlflow cannot start"):
        run(_cfg(corpus_dir, tmp_path / "pt", max_steps=2,
                 **{"track.loggers": ["mlflow"], "track.mlflow_uri": "nosuchscheme://x"}))
