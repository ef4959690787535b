"""Run tracking: the workspace's run registry (SQLite), written by training runs and read by the studio,
and the optional metric loggers (TensorBoard, MLflow) a run also sends its metrics to."""

from __future__ import annotations

from llmlab.track.loggers import MetricLoggers, TrackConfig, check_loggers
from llmlab.track.registry import Registry, RegistryError, RunRecorder, find_workspace

__all__ = ["MetricLoggers", "Registry", "RegistryError", "RunRecorder", "TrackConfig", "check_loggers",
           "find_workspace"]
