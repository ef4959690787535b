"""`llmlab eval` results recorded in a workspace's run registry (`llmlab.track`).

A model that is a run directory inside a workspace, or a checkpoint inside one (`checkpoints/step-N`,
`final/`), has each task's metrics recorded as evaluations of that run, and the results files as its
artefacts (kind "evaluation"). A task is recorded under its own name when the model evaluated is the
one the run directory stands for (its `final/`, else its newest checkpoint), and as `task@checkpoints/
step-00000004` for another of its checkpoints, so that evaluating several checkpoints of one run keeps
each one's numbers. A run folder the registry does not know yet is indexed first (`Registry.scan`).
Recording never fails the evaluation: a registry that cannot be written is reported on stderr.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

from llmlab.common import LlmlabError
from llmlab.models.io import resolve_model_dir
from llmlab.track import Registry, RegistryError, find_workspace

ARTEFACT = "evaluation"


def record_results(results: dict, models: list[str], files: list[Path],
                   say: Callable[[str], None] = lambda text: None) -> list[str]:
    """Record the results of each of `models` (paths, as `llmlab eval` named them) that is or lies in a
    run of a workspace, with `files` (results.json, samples.jsonl) as the run's artefacts; returns the
    recorded runs' keys. `say` receives one line per recorded run."""
    recorded = []
    for model in dict.fromkeys(models):
        workspace = find_workspace(model)
        if workspace is None:
            continue
        entries = [e for e in results["results"] if e["model"] == model]
        try:
            with Registry(workspace) as registry:
                run = run_of(registry, Path(model))
                if run is None:
                    continue
                suffix = _checkpoint_suffix(run, Path(model))
                for entry in entries:
                    values = {m: v["value"] for m, v in entry["metrics"].items() if v["value"] is not None}
                    registry.record_evaluation(run, entry["task"] + suffix, values)
                for file in files:
                    registry.add_artefact(run, ARTEFACT, file.resolve())
                key = registry.key(run)
        except (RegistryError, sqlite3.Error, OSError) as e:
            print(f"warning: the evaluation of {model} is not recorded in the workspace {workspace}: {e}",
                  file=sys.stderr, flush=True)
            continue
        recorded.append(key)
        say(f"recorded {len(entries)} task{'s' * (len(entries) != 1)} of {model} as evaluations of the run "
            f"{key} in the workspace {workspace}")
    return recorded


def run_of(registry: Registry, path: Path) -> Path | None:
    """The run folder of `registry` that `path` is or lies in (the nearest one above it), or None. A
    run folder (config.yaml beside metrics.jsonl) the registry does not know yet is indexed first."""
    folders = [f for f in (path.resolve(), *path.resolve().parents) if f.is_relative_to(registry.workspace)]
    for folder in folders:
        if registry.run(folder) is not None:
            return folder
    if any((f / "config.yaml").is_file() and (f / "metrics.jsonl").is_file() for f in folders):
        registry.scan()
        return next((f for f in folders if registry.run(f) is not None), None)
    return None


def _checkpoint_suffix(run: Path, model: Path) -> str:
    """"" when `model` is the checkpoint the run directory stands for, else "@" and its path in the run."""
    chosen = resolve_model_dir(model).resolve()
    try:
        if chosen == resolve_model_dir(run).resolve():
            return ""
    except LlmlabError:  # a run with no complete checkpoint of its own
        pass
    return "@" + (chosen.relative_to(run).as_posix() if chosen.is_relative_to(run) else str(chosen))
