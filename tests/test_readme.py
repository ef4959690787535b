"""The README stays true: its file tree names every module, and its Python example runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _tree_paths() -> set[str]:
    tree = README.split("## Files", 1)[1].split("```")[1]
    paths, stack = set(), []
    for line in tree.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m:
            continue
        depth, name = len(m.group(1)) // 2, m.group(2)
        stack[depth:] = [name.rstrip("/")]
        if not name.endswith("/"):
            paths.add("/".join(stack))
    return paths


def test_file_tree_lists_every_module_and_only_real_files():
    listed = _tree_paths()
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "llmlab").rglob("*.py")}
    assert len(modules) >= 12
    assert modules <= listed, f"add to the README tree: {sorted(modules - listed)}"
    missing = sorted(p for p in listed if not (ROOT / p).exists())
    assert not missing, f"the README tree lists files that do not exist: {missing}"


def test_python_examples_run():
    section = README.split("## Python", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python")[1:]]
    assert len(blocks) == 3
    code = "\n".join(line for b in blocks for line in b.splitlines() if "path/to/hf-folder" not in line)
    exec(compile(code, "README.md", "exec"), {})
