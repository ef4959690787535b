"""Imports only point left along the layers of DESIGN.md (checked by parsing every module)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "llmlab"

LAYERS = [
    {"config", "common"},
    {"models", "tokenizer", "track"},
    {"data", "peft", "quant", "generate", "plan"},
    {"train", "align", "eval"},
    {"search", "serve", "studio"},
    {"cli", "demo", "__main__", "__init__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
# model family files know only the shared primitives: never conversion, I/O or presets
FAMILY_FILES_MAY_IMPORT = {"llmlab.models.layers", "llmlab.models.kernels", "llmlab.models.moe", "llmlab.common",
                           "llmlab.config"}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return [m for m in found if m == "llmlab" or m.startswith("llmlab.")]


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        yield ".".join(rel.parts), path


def test_every_module_sits_in_a_layer():
    modules = list(_modules())
    assert len(modules) >= 12
    unknown = {_component(m) for m, _ in modules} - LEVEL.keys()
    assert not unknown, f"add these to LAYERS (and to DESIGN.md): {unknown}"


def test_imports_only_point_left():
    bad = []
    for module, path in _modules():
        level = LEVEL[_component(module)]
        for imported in _imports(path):
            if imported != "llmlab" and LEVEL[_component(imported)] > level:
                bad.append(f"{module} imports {imported}")
    assert not bad, bad


def test_model_family_files_import_only_primitives():
    families = [p for p in (ROOT / "models").glob("*.py") if p.stem not in ("__init__", "convert", "io", "presets")]
    assert {p.stem for p in families} >= {"gpt", "llama", "layers"}
    for path in families:
        extra = set(_imports(path)) - FAMILY_FILES_MAY_IMPORT - {"llmlab.models.layers"}
        assert not extra, f"{path.name} imports {extra}"


def test_relative_imports_are_not_used():
    # the layering check reads absolute imports; a relative one would slip past it
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{module} uses a relative import"
