"""Prompting strategies: few-shot prompts, chain of thought, self-consistency and tree of thoughts.

The prompt builders are pure functions from examples to a string. Self-consistency samples reasoning
paths with a `TextGenerator` and votes on their answers. Tree of thoughts searches over partial
solutions through a three-method `Thinker` interface (propose next thoughts, score a partial
solution, recognise a finished one), so the same search drives a pure-Python puzzle solver in the
tests and a language model through `ModelThinker`.

A state of the tree is the tuple of thoughts taken so far; the problem itself belongs to the
thinker. Tuples keep every state hashable (the search memoises proposals and scores) and make the
path to a state the state itself.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from llmlab.generate.engine import sequence_logprobs
from llmlab.generate.sampling import GenerationError, SamplingParams
from llmlab.generate.text import TextGenerator

QA_TEMPLATE = "Q: {input}\nA: {output}\n\n"  # one exemplar; the query is this cut before {output}
COT_TRIGGER = "Let's think step by step."  # zero-shot chain-of-thought trigger (Kojima et al. 2022)
ANSWER_PREFIX = "The answer is"  # how chain-of-thought exemplars state their answer (Wei et al. 2022)

_ANSWER_RE = re.compile(r"the answer is\s*:?\s*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


# --------------------------------------------------------------------------- few-shot prompts


@dataclass(frozen=True)
class Example:
    """A solved instance shown to the model: the input, the expected output and, for chain of
    thought, the reasoning that leads from one to the other."""

    input: str
    output: str
    rationale: str | None = None


def _template_pieces(template: str) -> list[tuple[str, str | None]]:
    """(literal text, field name or None) pieces of a template with the plain fields {input} then
    {output}, each exactly once; GenerationError otherwise."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise GenerationError(f"template {template!r} is not a valid format string: {e}") from None
    fields = [name for _, name, _, _ in parsed if name is not None]
    if fields != ["input", "output"]:
        raise GenerationError(f"template {template!r} must contain {{input}} then {{output}}, each once and "
                              f"nothing else (literal braces are written {{{{ and }}}}); it has fields {fields}")
    if any(spec or conversion for _, name, spec, conversion in parsed if name is not None):
        raise GenerationError(f"template {template!r}: write the fields as plain {{input}} and {{output}}")
    return [(literal, name) for literal, name, _, _ in parsed]


def _render(pieces: list[tuple[str, str | None]], input: str, output: str | None) -> str:
    """An exemplar, or with output=None the query: the text up to {output}, trailing spaces removed
    because a byte-level BPE attaches the space to the next word, which the model should write."""
    out = []
    for literal, name in pieces:
        out.append(literal)
        if name == "input":
            out.append(input)
        elif name == "output":
            if output is None:
                return "".join(out).rstrip(" ")
            out.append(output)
    return "".join(out)


def _choose(examples: Sequence[Example], k: int | None, seed: int | None) -> list[Example]:
    if k is None:
        k = len(examples)
    if not 0 <= k <= len(examples):
        raise GenerationError(f"k={k} exemplars asked for, but k must be between 0 and the {len(examples)} "
                              "examples given")
    if seed is None:
        return list(examples[:k])
    # the seed picks which exemplars; they keep the given order, so order effects do not vary with it
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), k))]


def few_shot_prompt(query: str, examples: Sequence[Example] = (), k: int | None = None, *, instruction: str = "",
                    template: str = QA_TEMPLATE, seed: int | None = None) -> str:
    """A k-shot prompt (Brown et al. 2020, "Language Models are Few-Shot Learners"): the optional
    instruction, k solved exemplars, then the query left for the model to answer.

    k=0 gives a zero-shot prompt, k=1 one-shot, k=None every example. Exemplars are the first k, or
    k drawn by `seed` (kept in their given order). Each exemplar is `template` filled in; the query
    is `template` up to `{output}`. With the default template and k=1:

        Q: 2+2?
        A: 4

        Q: 3+5?
        A:

    Raises:
        GenerationError: k is negative or larger than the number of examples, or the template is not
            `{input}` then `{output}`.
    """
    pieces = _template_pieces(template)
    shots = [_render(pieces, e.input, e.output) for e in _choose(examples, k, seed)]
    head = f"{instruction}\n\n" if instruction else ""
    return head + "".join(shots) + _render(pieces, query, None)


# --------------------------------------------------------------------------- chain of thought


def chain_of_thought_prompt(query: str, examples: Sequence[Example] = (), k: int | None = None, *,
                            instruction: str = "", template: str = QA_TEMPLATE, seed: int | None = None,
                            trigger: str = COT_TRIGGER) -> str:
    """A chain-of-thought prompt.

    With exemplars (Wei et al. 2022, "Chain-of-Thought Prompting Elicits Reasoning in Large Language
    Models") each answer is the rationale followed by "The answer is X.", so the model reasons before
    it answers and states the answer in a form `extract_answer` finds. Without exemplars (k=0 or no
    examples) the query's answer starts with `trigger`, "Let's think step by step." (Kojima et al.
    2022, "Large Language Models are Zero-Shot Reasoners"); exemplars already show the reasoning, so
    a few-shot prompt gets no trigger.

    Raises:
        GenerationError: an example has no rationale, or as `few_shot_prompt`.
    """
    missing = [i for i, e in enumerate(examples) if not e.rationale]
    if missing:
        raise GenerationError(f"example {missing[0]} has no rationale; chain-of-thought exemplars need one")
    worked = [Example(e.input, f"{e.rationale.strip()} {ANSWER_PREFIX} {e.output}.") for e in examples]
    prompt = few_shot_prompt(query, worked, k, instruction=instruction, template=template, seed=seed)
    zero_shot = k == 0 or not examples
    return f"{prompt} {trigger}" if zero_shot and trigger else prompt


def extract_answer(text: str, pattern: str | re.Pattern[str] | None = None) -> str | None:
    """The final answer stated in a reasoning path, or None when it states none.

    By default: the phrase after the first "The answer is" (any case) up to the end of its sentence
    or line, else the last number in the text. The first statement wins because a model that keeps
    going after answering tends to invent the next exemplar. Numbers lose thousands separators
    ("1,000" -> "1000") so that equal answers vote together.

    With `pattern`, the first match's group 1 (or the whole match if the pattern has no group) and
    no fallback.
    """
    if pattern is not None:
        m = re.search(pattern, text)
        if m is None:
            return None
        found = (m.group(1) if m.re.groups else m.group(0)).strip()
        return found or None
    m = _ANSWER_RE.search(text)
    answer = m.group(1).strip().rstrip(".").strip() if m else ""
    if not answer:
        numbers = _NUMBER_RE.findall(text)
        if not numbers:
            return None
        answer = numbers[-1]
    return answer.replace(",", "") if _NUMBER_RE.fullmatch(answer) else answer


# --------------------------------------------------------------------------- self-consistency


@dataclass
class Vote:
    """Outcome of self-consistency: the sampled paths, the answer each gives and the tally."""

    answer: str | None  # the most frequent answer; None when no path gives one
    counts: dict[str, int]  # answer -> paths giving it, most frequent first, ties in order of first appearance
    paths: list[str]  # the sampled reasoning paths, in sample order
    answers: list[str | None]  # the answer extracted from each path

    @property
    def agreement(self) -> float:
        """Fraction of all paths that give the winning answer: Wang et al. find accuracy rises with it."""
        return self.counts[self.answer] / len(self.paths) if self.answer is not None else 0.0


def majority_vote(answers: Iterable[str | None]) -> tuple[str | None, dict[str, int]]:
    """The most frequent non-None answer and the counts of all of them, most frequent first.

    Ties go to the answer that appeared first, so the outcome is a function of the sample order.
    """
    first_seen = Counter(a for a in answers if a is not None)  # a Counter keeps first-insertion order
    counts = dict(sorted(first_seen.items(), key=lambda item: -item[1]))  # stable: ties stay in that order
    return next(iter(counts), None), counts


def self_consistency(generator: TextGenerator, prompt: str, params: SamplingParams, *,
                     extract: Callable[[str], str | None] = extract_answer, stop: Sequence[str] = ("\n\n",)) -> Vote:
    """Self-consistency (Wang et al. 2023, "Self-Consistency Improves Chain of Thought Reasoning in
    Language Models"): sample `params.n` reasoning paths for a chain-of-thought `prompt` and return
    the answer most of them reach.

    This is the paper's unweighted majority vote, which it finds about as accurate as weighting paths
    by their probability. Paths from which `extract` gets no answer do not vote. `stop` ends a path
    (the default is the blank line that separates exemplars in `QA_TEMPLATE`).

    Raises:
        GenerationError: n > 1 with greedy decoding (temperature 0, one beam), which would give n
            copies of one path, or as `TextGenerator.complete`.
    """
    if params.greedy and params.num_beams == 1 and params.n > 1:
        raise GenerationError(f"self-consistency needs diverse paths: n={params.n} greedy paths are identical; "
                              "set temperature > 0")
    paths = [c.text for c in generator.complete([prompt], params, stop=list(stop))]
    answers = [extract(p) for p in paths]
    answer, counts = majority_vote(answers)
    return Vote(answer, counts, paths, answers)


# --------------------------------------------------------------------------- tree of thoughts

State = tuple[str, ...]  # the thoughts taken so far, oldest first


class Thinker(Protocol):
    """What tree of thoughts needs from a problem: proposals, a value and a goal test for a state."""

    def propose(self, state: State) -> list[str]:
        """Candidate next thoughts after `state` (an empty list makes it a dead end)."""

    def score(self, state: State) -> float:
        """Value of a partial solution: higher is more promising."""

    def is_solution(self, state: State) -> bool:
        """Whether `state` solves the problem; the search expands a solution no further."""


@dataclass
class ThoughtSearch:
    """Outcome of `tree_of_thoughts`."""

    thoughts: State  # the path from the root to the returned state, one thought per step
    score: float  # that state's value (with look-ahead, as the search ranked it)
    solved: bool  # whether the thinker accepts it as a solution
    expanded: list[State]  # every state whose proposals were asked for, in order (look-ahead included)


class _Tree:
    """Proposals and values of one search, each computed at most once per state."""

    def __init__(self, thinker: Thinker, root: State, max_depth: int, lookahead: int,
                 max_expansions: int | None):
        self.thinker, self.root, self.max_depth, self.lookahead = thinker, root, max_depth, lookahead
        self.max_expansions = max_expansions
        self.children_of: dict[State, list[State]] = {}  # insertion order = expansion order
        self.scores: dict[State, float] = {}
        self.values: dict[tuple[State, int], float] = {}
        self.best: tuple[float, State] | None = None

    def children(self, state: State) -> list[State]:
        """The next states, duplicate proposals dropped; none once the expansion budget is spent."""
        if state not in self.children_of:
            if self.max_expansions is not None and len(self.children_of) >= self.max_expansions:
                return []
            self.children_of[state] = [(*state, t) for t in dict.fromkeys(self.thinker.propose(state))]
        return self.children_of[state]

    def score(self, state: State) -> float:
        if state not in self.scores:
            self.scores[state] = float(self.thinker.score(state))
        return self.scores[state]

    def value(self, state: State, horizon: int) -> float:
        """The best score among the states `horizon` steps below `state`; a solution or a dead end on the
        way counts with its own score."""
        key = (state, horizon)
        if key not in self.values:
            kids = [] if horizon == 0 or self.thinker.is_solution(state) else self.children(state)
            if kids:
                self.values[key] = max(self.value(k, horizon - 1) for k in kids)
            else:
                self.values[key] = self.score(state)
        return self.values[key]

    def rank(self, states: list[State], prune_below: float | None) -> list[tuple[State, float]]:
        """States with their values, best first (ties keep the given order), those under prune_below dropped.

        Look-ahead never reaches past max_depth: a state the search cannot take must not lend its value.
        """
        ranked = []
        for s in states:
            v = self.value(s, min(self.lookahead, self.max_depth - (len(s) - len(self.root))))
            # on a tie the deeper state wins: a look-ahead value is earned by the state that reaches it
            if self.best is None or (v, len(s)) > (self.best[0], len(self.best[1])):
                self.best = (v, s)
            if prune_below is None or v >= prune_below:
                ranked.append((s, v))
        return sorted(ranked, key=lambda sv: -sv[1])


def tree_of_thoughts(thinker: Thinker, *, strategy: Literal["bfs", "dfs"] = "bfs", breadth: int = 3,
                     max_depth: int = 3, lookahead: int = 0, prune_below: float | None = None,
                     max_expansions: int | None = None, root: Sequence[str] = ()) -> ThoughtSearch:
    """Tree of thoughts (Yao et al. 2023, "Tree of Thoughts: Deliberate Problem Solving with Large
    Language Models"): search over partial solutions, with the thinker proposing next thoughts and
    valuing the states they lead to.

    - "bfs" (the paper's Algorithm 1, a beam search): at each depth expand every kept state, value all
      children and keep the `breadth` best. Stops at the first depth where a child is a solution and
      returns the best-valued one (pruned children excluded).
    - "dfs" (Algorithm 2): follow the best-valued child first, trying at most `breadth` children per
      state, and backtrack to the next sibling when a subtree holds no solution within `max_depth`
      steps. Children valued under `prune_below` are never entered, so a threshold makes it give up
      on a weak branch early. Returns the first solution found.

    A state's value is the thinker's best score among the states `lookahead` steps further down, a
    solution or dead end met on the way counting as it is (0: its own score). Look-ahead lets a step
    that looks poor now win on where it leads, and one that leads nowhere lose; it never looks past
    `max_depth`. `prune_below` drops low-valued children in both strategies.
    The search stops expanding after `max_expansions` proposal calls (None: no limit).

    Returns:
        The solution found, or when there is none the best-valued state seen (solved=False).

    Raises:
        GenerationError: an unknown strategy or a non-positive breadth or depth, or a negative lookahead.
    """
    if strategy not in ("bfs", "dfs"):
        raise GenerationError(f"strategy must be 'bfs' or 'dfs', got {strategy!r}")
    for name, value, low in [("breadth", breadth, 1), ("max_depth", max_depth, 1), ("lookahead", lookahead, 0)]:
        if value < low:
            raise GenerationError(f"{name} must be an integer >= {low}, got {value}")
    start = tuple(root)
    tree = _Tree(thinker, start, max_depth, lookahead, max_expansions)
    if thinker.is_solution(start):
        return ThoughtSearch(start, tree.score(start), True, [])
    found = (_bfs if strategy == "bfs" else _dfs)(tree, breadth, prune_below)
    if found is not None:
        state, value = found
        return ThoughtSearch(state, value, True, list(tree.children_of))
    value, state = tree.best if tree.best is not None else (tree.score(start), start)
    return ThoughtSearch(state, value, thinker.is_solution(state), list(tree.children_of))


def _bfs(tree: _Tree, breadth: int, prune_below: float | None) -> tuple[State, float] | None:
    frontier = [tree.root]
    for _ in range(tree.max_depth):
        ranked = tree.rank([c for s in frontier for c in tree.children(s)], prune_below)
        solutions = [(s, v) for s, v in ranked if tree.thinker.is_solution(s)]
        if solutions:
            return solutions[0]
        frontier = [s for s, _ in ranked[:breadth]]
        if not frontier:
            return None
    return None


def _dfs(tree: _Tree, breadth: int, prune_below: float | None) -> tuple[State, float] | None:
    def visit(state: State, value: float) -> tuple[State, float] | None:
        if tree.thinker.is_solution(state):
            return state, value
        if len(state) - len(tree.root) == tree.max_depth:
            return None
        for child, child_value in tree.rank(tree.children(state), prune_below)[:breadth]:
            found = visit(child, child_value)
            if found is not None:
                return found
        return None  # every child failed: backtrack

    return visit(tree.root, float("-inf"))


# --------------------------------------------------------------------------- a model as the thinker

PROPOSE_TEMPLATE = "Problem: {problem}\nSteps so far:\n{steps}\nNext step:"
VALUE_TEMPLATE = ("Problem: {problem}\nSteps so far:\n{steps}\n"
                  "Can these steps reach a correct answer (sure/likely/impossible)?\nVerdict:")
# the weights Yao et al. give their Game of 24 value verdicts
VALUE_WORDS: Mapping[str, float] = {"sure": 20.0, "likely": 1.0, "impossible": 0.001}


def gives_answer(state: State) -> bool:
    """Whether the newest thought states an answer ("The answer is ...", any case)."""
    return bool(state) and ANSWER_PREFIX.lower() in state[-1].lower()


class ModelThinker:
    """A language model as proposer and judge for `tree_of_thoughts` (Yao et al. 2023).

    Proposals follow the paper's "sample" strategy: `n_proposals` i.i.d. continuations of
    `propose_template`, each cut at the first newline so that one thought is one line; empty and
    repeated ones are dropped (sample with temperature > 0, or every proposal is the same). A state's
    score follows the paper's "value" prompts, with the verdict read off the model's probabilities
    instead of sampled: p(word | value prompt) over `value_words`, renormalised over those words,
    weighted by each word's value, i.e. the expected value of one sampled verdict.

    Both templates are formatted with `{problem}` and `{steps}` (the thoughts so far, one a line,
    or "(none)"). A state is a solution when `is_solution` says so; by default when its last thought
    states an answer.

    Args:
        generator: the model and tokenizer.
        problem: the task, shown in both prompts.
        params: sampling of proposals (max_new_tokens bounds a thought; n and num_beams are replaced:
            each expansion draws n_proposals samples).
        n_proposals: continuations sampled per expansion.
        value_words: verdict -> value; each is scored as the continuation " word".
    """

    def __init__(self, generator: TextGenerator, problem: str, params: SamplingParams, *, n_proposals: int = 3,
                 propose_template: str = PROPOSE_TEMPLATE, value_template: str = VALUE_TEMPLATE,
                 value_words: Mapping[str, float] = VALUE_WORDS,
                 is_solution: Callable[[State], bool] = gives_answer):
        if n_proposals < 1:
            raise GenerationError(f"n_proposals must be an integer >= 1, got {n_proposals}")
        if not value_words:
            raise GenerationError("value_words must name at least one verdict")
        for template in (propose_template, value_template):
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            if not fields <= {"problem", "steps"}:
                raise GenerationError(f"template {template!r} may use only {{problem}} and {{steps}}, "
                                      f"not {sorted(fields - {'problem', 'steps'})}")
        self.generator, self.problem, self.params = generator, problem, params
        self.n_proposals, self.value_words = n_proposals, dict(value_words)
        self.propose_template, self.value_template = propose_template, value_template
        self._is_solution = is_solution

    def _prompt(self, template: str, state: State) -> str:
        return template.format(problem=self.problem, steps="\n".join(state) if state else "(none)")

    def propose(self, state: State) -> list[str]:
        params = replace(self.params, n=self.n_proposals, num_beams=1)
        out = self.generator.complete([self._prompt(self.propose_template, state)], params, stop=["\n"])
        return list(dict.fromkeys(t for t in (c.text.strip() for c in out) if t))

    def verdicts(self, state: State) -> dict[str, float]:
        """Probability of each verdict word after the value prompt, renormalised over the words."""
        context = self.generator.encode(self._prompt(self.value_template, state))
        # the prompt ends before a space and the word's leading space starts a new BPE pre-token, so
        # the word encodes the same alone as after the prompt
        words = [self.generator.tokenizer.encode(" " + w) for w in self.value_words]
        need = len(context) + max(len(w) for w in words)
        if need > self.generator.context:
            raise GenerationError(f"the value prompt plus a verdict needs {need} tokens but the context window is "
                                  f"{self.generator.context}; shorten the problem or the search depth")
        logps = sequence_logprobs(self.generator.engine.model, context, words)
        top = max(logps)
        weights = [math.exp(lp - top) for lp in logps]
        total = sum(weights)
        return {w: x / total for w, x in zip(self.value_words, weights)}

    def score(self, state: State) -> float:
        return sum(p * self.value_words[w] for w, p in self.verdicts(state).items())

    def is_solution(self, state: State) -> bool:
        return self._is_solution(state)
