"""The hardening workspace, built once per session, and its pristine copy to restore it from."""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hardening import workspace


@dataclass
class Workspace:
    root: Path  # where the commands run (their working directory)
    pristine: Path  # an untouched copy
    values: dict[str, str]  # placeholder -> path
    before: dict  # the snapshot every case must leave behind

    def check_and_restore(self) -> list[str]:
        """What the last command changed in the workspace (empty: nothing); the workspace is restored."""
        changes = workspace.difference(self.before, workspace.snapshot(self.root))
        if changes:
            workspace.restore(self.root, self.pristine)
        return changes


@pytest.fixture(scope="session")
def hardening_workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("hardening")
    root = base / "ws"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        values = workspace.build(root)
        with contextlib.suppress(ImportError):  # it prints a warning when first imported
            import bitsandbytes  # noqa: F401
    sock, port = workspace.busy_port()
    values["busy_port"] = str(port)
    free, free_port = workspace.busy_port()
    free.close()
    values["free_port"] = str(free_port)
    pristine = base / "pristine"
    shutil.copytree(root, pristine, symlinks=True)
    yield Workspace(root, pristine, values, workspace.snapshot(root))
    sock.close()
