"""Every bad command line of `cli_cases.txt`, run in-process through `llmlab.cli.main`: the exit code,
one `error:` line naming the field or file, no traceback, and the workspace unchanged byte for byte."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.hardening.runner import needle_problems, run_cli
from tests.hardening.workspace import substitute

TABLE = Path(__file__).with_name("cli_cases.txt")


def verb(argv: str) -> str:
    words = argv.split()
    return " ".join(words[:2]) if words[0] in ("data", "tokenizer", "scaling") else words[0]


def read_cases(path: Path) -> list:
    """The table's cases as pytest params (code, needle, argv), each named by its line number and verb."""
    cases = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        code, needle, argv = (part.strip() for part in line.split(" | ", 2))
        cases.append(pytest.param(int(code), needle, argv, id=f"{number}-{verb(argv).replace(' ', '-')}"))
    return cases


CASES = read_cases(TABLE)


def test_the_table_covers_every_verb():
    assert {verb(c.values[2]) for c in CASES} == {"demo", "data prepare", "data synth", "tokenizer train", "pretrain",
                                                   "finetune", "scaling fit", "scaling moe", "generate", "chat",
                                                   "serve", "convert",
                                                   "plan", "eval", "align", "data distill", "data tasks"}
    assert len(CASES) >= 160


@pytest.mark.parametrize("code, needle, argv", CASES)
def test_bad_command_line(hardening_workspace, monkeypatch, code, needle, argv):
    ws = hardening_workspace
    monkeypatch.chdir(ws.root)
    args = [substitute(a, ws.values) for a in shlex.split(argv)]
    needle = substitute(needle, ws.values)
    got, stdout, stderr = run_cli(args)
    changes = ws.check_and_restore()

    problems = []
    if got != code:
        problems.append(f"exit {got}, expected {code}")
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if "Traceback (most recent call last)" in text:
            problems.append(f"a traceback on {name}")
        if "internal error" in text:
            problems.append(f"'internal error' on {name} (the catch-all for bugs)")
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code == 1:
        errors = [line for line in lines if line.startswith("error:")]
        if len(errors) != 1 or len(lines) != 1:
            problems.append(f"stderr should be one line starting with 'error:', got {len(lines)} lines "
                            f"({len(errors)} starting with 'error:')")
        if errors:
            problems += [f"the error line {p}" for p in needle_problems(needle, errors[0])]
    else:  # argparse: usage, then "llmlab VERB: error: ..."
        errors = [line for line in lines if ": error: " in line]
        if len(errors) != 1:
            problems.append(f"stderr should hold one argparse 'error:' line, got {len(errors)}")
        else:
            problems += [f"the error line {p}" for p in needle_problems(needle, errors[0])]
    for i, a in enumerate(args[:-1]):
        if a == "--prompt" and args[i + 1] and args[i + 1] in stdout and got != 0:
            problems.append("the prompt was printed although the command failed")
    if changes:
        problems.append(f"the workspace changed: {'; '.join(changes[:8])}"
                        + (f" (+{len(changes) - 8} more)" if len(changes) > 8 else ""))
    first = next((line for line in lines if "error:" in line), lines[0] if lines else "(nothing)")
    assert not problems, ("; ".join(problems) + f"\n  stderr: {first[:400]}\n  stderr lines: {len(lines)}, "
                          f"stdout tail: {stdout[-300:]!r}")
