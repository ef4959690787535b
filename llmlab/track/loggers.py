"""Metric loggers: a training run's metrics lines sent on to TensorBoard and MLflow as well.

`track.loggers=[tensorboard,mlflow]` on any training verb. Rank 0 hands each logger every line it
writes to metrics.jsonl (`llmlab.train.core.Run.log`), and the logger writes each numeric field but
`step` as a scalar at the line's step (a list of numbers, such as an MoE's `expert_load`, as one scalar
per item: `expert_load/0`, `expert_load/1`, ...).

- tensorboard: event files in `<out_dir>/tensorboard/` (`tensorboard --logdir runs/` shows every run).
  A resumed run hides the events its killed predecessor wrote past the checkpoint it resumes from.
- mlflow: one MLflow run per llmlab run, in `track.experiment`: its params are the config flattened
  to dotted keys, its metrics the lines, batched (at most one request every `MLFLOW_FLUSH_S`), and it
  ends FINISHED, KILLED (a signal stopped the run) or FAILED (an error), as the workspace registry
  records it. A resumed run continues the MLflow run of its folder. The store is `track.mlflow_uri`,
  else `$MLFLOW_TRACKING_URI`, else a file store in `<out_dir>/mlruns/` (`mlflow ui --backend-store-uri
  runs/pt/mlruns`; MLflow 3 keeps that store behind MLFLOW_ALLOW_FILE_STORE, which is set for it).

The packages are optional (`pip install 'llmlab[track]'`): a run that names a logger whose package is
missing stops before it loads anything, saying what to install. A logger that fails while the run
trains is reported once on stderr and dropped; the run goes on, and metrics.jsonl has every line.
"""

from __future__ import annotations

import dataclasses
import getpass
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from llmlab.common import LlmlabError
from llmlab.config import flatten, to_dict

LOGGERS = ("tensorboard", "mlflow")
INSTALL = "pip install 'llmlab[track]'"
MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow"}  # what each logger imports
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny"}
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}  # a run's end -> MLflow's
MLFLOW_FLUSH_S = 5.0  # a request per line would slow a run that logs to a remote server
MLFLOW_BATCH = (1000, 100)  # the most metrics and params one MLflow request may carry
TENSORBOARD_FLUSH_S = 10  # how stale the event files may be while the run trains


@dataclass
class TrackConfig:
    loggers: list[Literal["tensorboard", "mlflow"]] = field(default_factory=list)  # metrics go there too
    tensorboard_dir: str = ""  # the run's event files; "" = <out_dir>/tensorboard
    mlflow_uri: str = ""  # MLflow server or folder; "" = $MLFLOW_TRACKING_URI, else a file store in <out_dir>/mlruns
    experiment: str = "llmlab"  # the MLflow experiment, made when missing
    run_name: str = ""  # the MLflow run's name; "" = the out_dir's folder name
    tags: dict[str, str] = field(default_factory=dict)  # the MLflow run's tags (track.tags.team=nlp)

    def __post_init__(self):
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise ValueError(f"loggers: unknown logger {unknown[0]!r}; the loggers are {', '.join(LOGGERS)}")
        if not self.experiment:
            raise ValueError("experiment is empty: name the MLflow experiment the run goes into")


def check_loggers(cfg: TrackConfig) -> None:
    """LlmlabError naming what to install when a logger of `cfg.loggers` cannot be imported; a run calls
    this first, on every rank, so that it stops before it loads anything."""
    for name in dict.fromkeys(cfg.loggers):
        try:
            importlib.import_module(MODULES[name])
        except ImportError as e:
            raise LlmlabError(f"track.loggers names {name}, which needs the {PACKAGES[name]} package ({e}); "
                              f"install it with `{INSTALL}`, or drop {name} from track.loggers") from None


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics line but its step, a list of numbers as one field per item."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if _number(value):
            out[key] = float(value)
        elif isinstance(value, (list, tuple)) and value and all(_number(v) for v in value):
            out.update((f"{key}/{i}", float(v)) for i, v in enumerate(value))
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricLoggers:
    """The loggers a run chose, fed its metrics lines and ended with its status. Never stops the
    run once it trains: a logger that fails is reported once on stderr and dropped."""

    def __init__(self, loggers: dict):
        self.loggers = loggers

    @classmethod
    def open(cls, cfg: TrackConfig, run_dir: str | os.PathLike, *, config: object, kind: str | None,
             start: int) -> MetricLoggers | None:
        """The loggers of `cfg` for the run in `run_dir`, resuming after step `start` (0: a fresh start);
        None when it names none. `config` is the run's config dataclass (or a dict), MLflow's params. A
        logger that cannot start (a missing package, an unreachable server) is an LlmlabError."""
        if not cfg.loggers:
            return None
        check_loggers(cfg)
        config = to_dict(config) if dataclasses.is_dataclass(config) else dict(config)
        run_dir, opened = Path(run_dir), {}
        for name in dict.fromkeys(cfg.loggers):
            try:
                if name == "tensorboard":
                    opened[name] = TensorBoardLogger(Path(cfg.tensorboard_dir or run_dir / "tensorboard"), start)
                else:
                    opened[name] = MLflowLogger(cfg, run_dir, config, kind, start)
            except Exception as e:  # whatever the package raises: a bad URI, a server that is down, ...
                cls(opened).end("failed")
                raise LlmlabError(f"track.loggers: {name} cannot start: {type(e).__name__}: {e}") from None
        return cls(opened)

    def log(self, record: dict) -> None:
        step = record.get("step")
        values = scalars(record)
        if not isinstance(step, int) or not values:
            return
        for name, logger in list(self.loggers.items()):
            try:
                logger.log(step, values)
            except Exception as e:  # the run goes on without this logger
                self._drop(name, e)

    def end(self, status: str) -> None:
        """End every logger; `status` is the run's: finished, stopped or failed."""
        for name, logger in list(self.loggers.items()):
            try:
                logger.close(status)
            except Exception as e:
                self._drop(name, e)
        self.loggers = {}

    def _drop(self, name: str, error: Exception) -> None:
        del self.loggers[name]
        print(f"warning: {name} logging stopped ({type(error).__name__}: {error}); the run goes on, and "
              "metrics.jsonl has every line", file=sys.stderr, flush=True)


class TensorBoardLogger:
    """Scalars into TensorBoard event files in `folder`."""

    def __init__(self, folder: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides the folder's earlier events from this step on: a resumed run's, past its
        # checkpoint; all of them when the run starts over
        self.writer = SummaryWriter(str(folder), purge_step=start + 1 if start else 0,
                                    flush_secs=TENSORBOARD_FLUSH_S)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


class MLflowLogger:
    """One MLflow run: the config as params, the metrics lines as metrics, the end as its status."""

    def __init__(self, cfg: TrackConfig, run_dir: Path, config: dict, kind: str | None, start: int):
        uri = cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if urlparse(uri).scheme in ("", "file"):  # MLflow 3 keeps its file store behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient

        self.client, self.pending, self.last = MlflowClient(tracking_uri=uri), [], 0.0
        experiment = self._experiment(cfg.experiment)
        folder = str(run_dir.resolve())
        previous = self._previous(experiment, folder) if start else None
        if previous is not None:
            self.run_id, logged = previous.info.run_id, previous.data.params
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"mlflow.user": _user(), **cfg.tags, "llmlab.run_dir": folder}
            if kind:
                tags["llmlab.kind"] = kind
            run = self.client.create_run(experiment, run_name=cfg.run_name or run_dir.name, tags=tags)
            self.run_id, logged = run.info.run_id, {}
        try:  # MLflow refuses to change a param: a resumed run adds the keys its start did not have
            self._log_params({k: v if isinstance(v, str) else json.dumps(v)  # MLflow's params are text
                              for k, v in flatten(config).items() if k not in logged})
        except Exception:
            self.client.set_terminated(self.run_id, "FAILED")
            raise

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # made meanwhile by another run
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _previous(self, experiment: str, folder: str):
        """The newest MLflow run recorded for the run folder `folder`, or None."""
        if "'" in folder:  # not expressible in MLflow's filter syntax: a resume then starts a new MLflow run
            return None
        runs = self.client.search_runs([experiment], filter_string=f"tags.`llmlab.run_dir` = '{folder}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        items = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MLFLOW_BATCH[1]):
            self.client.log_batch(self.run_id, params=items[i:i + MLFLOW_BATCH[1]])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(key, value, now, step) for key, value in values.items()]
        if time.time() - self.last >= MLFLOW_FLUSH_S or len(self.pending) >= MLFLOW_BATCH[0]:
            self._flush()

    def _flush(self) -> None:
        pending, self.pending, self.last = self.pending, [], time.time()
        for i in range(0, len(pending), MLFLOW_BATCH[0]):
            self.client.log_batch(self.run_id, metrics=pending[i:i + MLFLOW_BATCH[0]])

    def close(self, status: str) -> None:
        try:
            self._flush()
        finally:
            self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"
