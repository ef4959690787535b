"""The parent of one studio job: `python -m llmlab.studio.jobrun JOB_DIR -- ARGS...` runs `llmlab
ARGS` (several commands, run while each succeeds, when `--then` separates them), passes SIGTERM and
SIGINT on to the command running, and writes its exit code to `JOB_DIR/exit_code` when it ends (128
+ the signal's number for a command killed by one, as a shell reports it). It imports nothing but
the standard library, so that a job starts as fast as its command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def commands(argv: list[str]) -> list[list[str]]:
    """A job's llmlab command lines (its arguments split at `--then`)."""
    lines = [[]]
    for arg in argv:
        if arg == "--then":
            lines.append([])
        else:
            lines[-1].append(arg)
    return [line for line in lines if line]


def run(folder: Path, argv: list[str]) -> int:
    """Run `llmlab ARGV` as this process's child, passing stop signals on, and record its exit code.
    `--then` separates commands run one after another while each succeeds."""
    child = None

    def forward(signum, frame):
        stopped.append(signum)
        if child is not None:
            child.send_signal(signum)

    stopped: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    code = 0
    for command in commands(argv):
        if stopped:
            code = 128 + stopped[0]
            break
        child = subprocess.Popen([sys.executable, "-m", "llmlab", *command])
        code = child.wait()
        if code < 0:  # killed by a signal: report it as a shell does
            code = 128 - code
        if code != 0:
            break
    part = folder / "exit_code.part"  # written whole, then renamed: a reader sees a number or nothing
    part.write_text(f"{code}\n")
    os.replace(part, folder / "exit_code")
    return code


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        sys.exit("usage: python -m llmlab.studio.jobrun JOB_DIR -- LLMLAB_ARGS...")
    sys.exit(run(Path(sys.argv[1]), sys.argv[3:]))
