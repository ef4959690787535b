"""Makes lm-evaluation-harness see llmlab's model: `lm_eval --model llmlab --model_args path=CKPT ...`.

lm-eval (0.4.x) has no plugin entry points: its model registry is filled by `lm_eval.models`,
and `get_model` imports that module only while the registry is empty, so registering before it ran
would hide every built-in model. The `llmlab_lm_eval.pth` file that installing llmlab puts in
site-packages (see setup.py) calls `install()` at interpreter start, which puts a finder on
`sys.meta_path`. The finder finds nothing itself; when `lm_eval.models` is imported, it lets the
other finders find it and makes its loader call `register()` once the module has run. `register()`
adds "llmlab" as a lazy "module:attribute" target, so neither llmlab nor torch is imported until
lm-eval builds the model.

The cost to every other program is this file's import and a string comparison per import; any
failure here is swallowed, so the worst case is lm-eval not knowing "llmlab" (`import
llmlab.eval.lm_eval_model` registers it too). This module is top-level so that importing it does
not import the llmlab package.
"""

from __future__ import annotations

import sys

NAME = "llmlab"
TARGET = "llmlab.eval.lm_eval_model:LlmlabLM"


def register() -> None:
    """Add "llmlab" to lm-eval's model registry, unless it is there (as this target or its class)."""
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


class LmEvalModelsFinder:
    """A meta-path finder for `lm_eval.models` alone, which defers to the others and registers after."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "lm_eval.models":
            return None
        try:
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is cls or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
            run = spec.loader.exec_module  # each spec has its own loader: patching it touches no other module

            def exec_module(module):
                run(module)
                try:
                    register()
                except Exception:
                    pass

            spec.loader.exec_module = exec_module
            return spec
        except Exception:
            return None  # the import goes on as if this finder were not there


def install() -> None:
    """Put the finder first on `sys.meta_path` (once); register now if lm_eval.models already ran."""
    if LmEvalModelsFinder not in sys.meta_path:
        sys.meta_path.insert(0, LmEvalModelsFinder)
    if "lm_eval.models" in sys.modules:
        register()
