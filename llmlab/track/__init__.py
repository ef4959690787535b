"""Run tracking: the workspace's run registry (SQLite), written by training runs and read by the studio."""

from __future__ import annotations

from llmlab.track.registry import Registry, RegistryError, RunRecorder, find_workspace

__all__ = ["Registry", "RegistryError", "RunRecorder", "find_workspace"]
