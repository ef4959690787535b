"""Rollouts for PPO and GRPO: sampled answers from the generation engine (batched, KV cache), laid out
as training tensors, and the rewards a checker or a reward model gives them."""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llmlab.common import LlmlabError
from llmlab.eval.metrics import exact_match
from llmlab.generate import SamplingParams
from llmlab.generate.text import TextGenerator

IGNORE = -100

Checker = Callable[[str, str, "str | None"], float]


@dataclass
class Rollout:
    """Sampled answers to a batch of prompts, as right-padded rows of prompt + answer tokens."""

    sequences: torch.Tensor  # (B, T + 1): prompt and answer tokens, right-padded
    targets: torch.Tensor  # (B, T): the next token where it is part of the answer, else -100
    mask: torch.Tensor  # (B, T) float: 1.0 on answer tokens (targets != -100)
    lengths: torch.Tensor  # (B,) real tokens of each row (prompt + answer)
    rows: list[tuple[list[int], list[int]]]  # (prompt ids, answer ids) of each row
    texts: list[str]  # each answer's text, up to its stop
    finished: list[bool]  # the answer ended at the end of turn (not cut at max_new_tokens)
    prompt_index: list[int]  # which prompt of the batch each row answers

    @property
    def input_ids(self) -> torch.Tensor:
        return self.sequences[:, :-1]


def sample(model: torch.nn.Module, tokenizer, template, prompts: Sequence[Sequence[int]], params: SamplingParams,
           device: torch.device) -> Rollout:
    """`params.n` answers to each prompt (token ids, the generation prompt included), stopped at the
    template's end of turn or at max_new_tokens."""
    was_training = model.training
    model.eval()
    try:
        completions = TextGenerator(model, tokenizer).complete(list(prompts), params, stop=[template.stop])
    finally:
        model.train(was_training)
    rows = [(list(prompts[c.prompt_index]), list(c.token_ids)) for c in completions]
    return layout(rows, [c.text for c in completions], [c.finish_reason == "stop" for c in completions],
                  [c.prompt_index for c in completions], tokenizer.pad_id or 0, device)


def layout(rows: list[tuple[list[int], list[int]]], texts: list[str], finished: list[bool], prompt_index: list[int],
           pad_id: int, device: torch.device) -> Rollout:
    """Training tensors for (prompt ids, answer ids) rows; an empty answer has no target."""
    width = max(len(p) + len(a) for p, a in rows)
    seqs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width - 1), IGNORE, dtype=torch.long)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        seqs[r, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        if answer:
            targets[r, len(prompt) - 1:len(prompt) + len(answer) - 1] = torch.tensor(answer)
        lengths[r] = len(prompt) + len(answer)
    seqs, targets, lengths = seqs.to(device), targets.to(device), lengths.to(device)
    return Rollout(seqs, targets, (targets != IGNORE).float(), lengths, rows, texts, finished, prompt_index)


# --------------------------------------------------------------------------- rewards


def load_checker(spec: str) -> Checker:
    """The checker `spec` names: "exact_match", or "module:function" (an importable callable taking
    (prompt, completion, answer) and returning a number)."""
    if spec == "exact_match":
        return lambda _prompt, completion, answer: float(answer is not None and exact_match(
            completion, answer, ignore_whitespace=True))
    module, _, name = spec.partition(":")
    if not module or not name:
        raise LlmlabError(f'reward.checker={spec!r}: expected "exact_match" or "module:function"')
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise LlmlabError(f"reward.checker={spec!r}: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise LlmlabError(f"reward.checker={spec!r}: {module!r} has no {name!r}") from None
    if not callable(fn):
        raise LlmlabError(f"reward.checker={spec!r}: {name!r} is not callable")
    return fn


class CheckTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CheckTimeout in the block after `seconds` (SIGALRM: the main thread of a POSIX process;
    elsewhere no limit). A checker stuck in Python code or a sleep is stopped; one stuck in C code
    that ignores signals is not."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CheckTimeout(f"took over {seconds:g} s (reward.timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def as_reward(value) -> float | None:
    """A checker's result as a float: any real number (bool, int, float, numpy scalars, a one-element
    tensor); an integer too large for a float is +-inf. None for anything else."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_rewards(checker: Checker, prompts: list[str], texts: list[str], answers: list[str | None],
                  timeout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(rewards (B,), valid (B,) bool, failures): each answer's reward from the checker. An answer whose
    check raises, exits, takes over `timeout` seconds or returns something other than a number is not
    valid (left out of the update, and what went wrong is listed in `failures`) rather than stopping
    the run; a NaN or infinite number is returned as it is, for the loop's `nonfinite` policy."""
    rewards, valid, failures = [], [], []
    for prompt, text, answer in zip(prompts, texts, answers):
        value = None
        try:
            with time_limit(timeout):
                value = checker(prompt, text, answer)
        except (Exception, SystemExit) as e:  # a user's checker may do anything: the answer is skipped and counted
            failures.append(f"{type(e).__name__}: {e}"[:200])
        reward = as_reward(value)
        if reward is None and value is not None:
            failures.append(f"returned {type(value).__name__}, not a number")
        rewards.append(0.0 if reward is None else reward)
        valid.append(reward is not None)
    return torch.tensor(rewards, dtype=torch.float64).float(), torch.tensor(valid), failures
