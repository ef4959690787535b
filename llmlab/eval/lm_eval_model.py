"""lm-evaluation-harness drives an llmlab model: `lm_eval --model llmlab --model_args path=CKPT --tasks ...`.

`LlmlabLM` is lm-eval's model interface (lm-eval >= 0.4.10) over `LocalLM`: it hands each request's
`Instance.args` to LocalLM, which tokenizes, batches and scores as lm-eval's own `hf` model does.
Model args: `path` (required: a checkpoint folder, run directory or HF folder), `device` (auto),
`dtype` (auto), `batch_size` ("auto" means max_batch_size, else 32). `device` and `batch_size` may
also come from lm-eval's --device and --batch_size; model_args win over them.

lm-eval finds "llmlab" through the `llmlab_lm_eval.pth` file that installing llmlab puts in
site-packages (llmlab_lm_eval_hook.py, at the repository root, says how). Importing this module
registers it too, and `python -m llmlab.eval.lm_eval_model ARGS` is the `lm_eval` command with it
registered, for where that file is missing (llmlab on PYTHONPATH rather than installed, or put in
place by a tool that leaves .pth files out).
"""

from __future__ import annotations

import logging
import sys

import lm_eval.models  # noqa: F401  # the built-in models first: get_model imports them only into an empty registry
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry
from lm_eval.utils import simple_parse_args_string

from llmlab.common import LlmlabError, choose_device
from llmlab.eval.lm import EvalError, LocalLM

NAME = "llmlab"
TARGET = "llmlab.eval.lm_eval_model:LlmlabLM"
DEFAULT_BATCH_SIZE = 32

logger = logging.getLogger(__name__)


def register() -> None:
    """Add "llmlab" to lm-eval's model registry as a lazy target, unless it is there already."""
    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


def batch_rows(batch_size: int | str, max_batch_size: int | None = None) -> int:
    """LocalLM's batch size from lm-eval's: a number, or "auto"/"auto:N" (LocalLM bounds each batch by
    a token budget itself, so "auto" is max_batch_size when given, else 32)."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return int(max_batch_size or DEFAULT_BATCH_SIZE)
    try:
        rows = int(batch_size)
    except (TypeError, ValueError):
        rows = 0
    if rows < 1:
        raise EvalError(f"batch_size={batch_size!r}: expected an integer >= 1 or auto")
    return rows


def here(device: str) -> str:
    """The device named, or the best one this machine has when it lacks it (lm-eval's CLI passes
    --device, "cuda:0" unless told otherwise, and its hf model falls back the same way)."""
    try:
        return str(choose_device(str(device)))
    except LlmlabError as e:
        best = str(choose_device("auto"))
        logger.warning("%s; using %s", e, best)
        return best


class LlmlabLM(LM):
    """An llmlab model under lm-evaluation-harness (registered as "llmlab")."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_batch_size: int | None = None):
        super().__init__()
        self.lm = LocalLM.from_path(str(path), device=here(device), dtype=str(dtype),
                                    batch_size=batch_rows(batch_size, max_batch_size))
        self._device = next(self.lm.model.parameters()).device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LlmlabLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> LlmlabLM:
        """model_args (arg_dict) win over what lm-eval adds from its own options (additional_config)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._answer("loglikelihood", requests, self.lm.loglikelihood)

    def loglikelihood_rolling(self, requests) -> list[float]:
        return self._answer("loglikelihood_rolling", requests, lambda args: self.lm.loglikelihood_rolling(
            [text for (text,) in args]))

    def generate_until(self, requests) -> list[str]:
        return self._answer("generate_until", requests, self.lm.generate_until)

    def _answer(self, kind: str, requests, ask) -> list:
        args = [request.args for request in requests]
        answers = ask(args)
        for a, answer in zip(args, answers):
            self.cache_hook.add_partial(kind, a, answer)  # lm-eval's --use_cache stores what passes here
        return answers

    def get_model_info(self) -> dict:
        return {"model_name": self.lm.name, "model_hash": self.lm.hash}


register()


def main(argv: list[str] | None = None) -> None:
    """The `lm_eval` command line (argv, else sys.argv[1:]) with "llmlab" registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
