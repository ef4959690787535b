"""Prompting strategies: exact few-shot and chain-of-thought prompts, answer extraction, the
self-consistency vote, and tree-of-thoughts search on a pure-Python puzzle and on a tiny model."""

from __future__ import annotations

import math
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from llmlab.generate import GenerationError, SamplingParams, sequence_logprobs
from llmlab.generate.prompting import (
    VALUE_TEMPLATE,
    VALUE_WORDS,
    Example,
    ModelThinker,
    State,
    Vote,
    chain_of_thought_prompt,
    extract_answer,
    few_shot_prompt,
    majority_vote,
    self_consistency,
    tree_of_thoughts,
)
from llmlab.generate.text import TextGenerator
from llmlab.models import LlamaConfig, build_model
from llmlab.tokenizer import train_bpe

EXAMPLES = [
    Example("2+2?", "4", "2 and 2 make 4."),
    Example("3*3?", "9", "Three threes make 9."),
    Example("5-1?", "4", "Taking 1 from 5 leaves 4."),
    Example("1+6?", "7", "1 and 6 make 7."),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # a dim-32 matmul is far cheaper than handing it to a second thread, which on a busy
    # 2-core machine can cost milliseconds per call
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def generator() -> TextGenerator:
    lines = [f"Q: what is {a} plus {b}?\nA: {a} and {b} make {a + b}. The answer is {a + b}."
             for a in range(20) for b in range(15)]
    tok = train_bpe(lines, vocab_size=300)
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                    max_seq_len=512)).eval()
    return TextGenerator(model, tok)


# --------------------------------------------------------------------------- few-shot prompts


def test_zero_one_and_three_shot_prompts_are_exact():
    assert few_shot_prompt("7+1?", EXAMPLES, k=0) == "Q: 7+1?\nA:"
    assert few_shot_prompt("7+1?") == "Q: 7+1?\nA:"  # no examples at all is zero-shot too
    assert few_shot_prompt("7+1?", EXAMPLES, k=1) == "Q: 2+2?\nA: 4\n\nQ: 7+1?\nA:"
    assert few_shot_prompt("7+1?", EXAMPLES, k=3, instruction="Answer the sum.") == (
        "Answer the sum.\n\nQ: 2+2?\nA: 4\n\nQ: 3*3?\nA: 9\n\nQ: 5-1?\nA: 4\n\nQ: 7+1?\nA:")
    assert few_shot_prompt("7+1?", EXAMPLES).count("Q: ") == 5  # k=None: every example


def test_a_seed_picks_exemplars_reproducibly_in_their_given_order():
    prompts = {seed: few_shot_prompt("7+1?", EXAMPLES, k=2, seed=seed) for seed in range(12)}
    assert few_shot_prompt("7+1?", EXAMPLES, k=2, seed=3) == prompts[3]
    assert len(set(prompts.values())) > 1  # the seed changes the choice
    for prompt in prompts.values():
        shown = [e for e in EXAMPLES if f"Q: {e.input}\n" in prompt]
        assert len(shown) == 2 and prompt.index(shown[0].input) < prompt.index(shown[1].input)


def test_custom_templates_and_literal_braces():
    template = "Input: {input}\nOutput: {output}\n---\n"
    assert few_shot_prompt("x", [Example("a", "b")], template=template) == "Input: a\nOutput: b\n---\nInput: x\nOutput:"
    braces = "{{ {input} }} => {output}\n"
    assert few_shot_prompt("q", [Example("a", "{b}")], template=braces) == "{ a } => {b}\n{ q } =>"


@pytest.mark.parametrize("k", [5, -1])
def test_k_outside_the_examples_is_an_error_naming_both(k):
    with pytest.raises(GenerationError, match=rf"k={k} .* 4 examples"):
        few_shot_prompt("7+1?", EXAMPLES, k=k)


@pytest.mark.parametrize("template", ["Q: {input}\n", "{output} {input}", "{input} {output} {extra}",
                                      "{input} {output} {input}", "{input!r} {output}", "{input} {output"])
def test_a_template_must_be_input_then_output(template):
    with pytest.raises(GenerationError, match="template"):
        few_shot_prompt("7+1?", EXAMPLES, k=1, template=template)


# --------------------------------------------------------------------------- chain of thought


def test_chain_of_thought_prompts_are_exact():
    assert chain_of_thought_prompt("7+1?", EXAMPLES, k=2) == (
        "Q: 2+2?\nA: 2 and 2 make 4. The answer is 4.\n\n"
        "Q: 3*3?\nA: Three threes make 9. The answer is 9.\n\n"
        "Q: 7+1?\nA:")
    assert chain_of_thought_prompt("7+1?") == "Q: 7+1?\nA: Let's think step by step."
    assert chain_of_thought_prompt("7+1?", EXAMPLES, k=0) == "Q: 7+1?\nA: Let's think step by step."
    assert chain_of_thought_prompt("7+1?", trigger="") == "Q: 7+1?\nA:"


def test_chain_of_thought_exemplars_need_a_rationale():
    with pytest.raises(GenerationError, match="example 1 has no rationale"):
        chain_of_thought_prompt("7+1?", [EXAMPLES[0], Example("1+1?", "2")])


@pytest.mark.parametrize("text, answer", [
    ("2 and 2 make 4. The answer is 4.", "4"),
    ("The answer is 42", "42"),
    ("the answer is: 1,000.\nQ: next", "1000"),
    ("so The answer is 3.5 apples. Then more", "3.5 apples"),
    ("The answer is Paris.\nQ: and Italy?\nA: The answer is Rome.", "Paris"),  # the first statement wins
    ("She has 3 apples and buys 4 more, so 7", "7"),  # no phrase: the last number
    ("between -2.5 and 12,345 somewhere", "12345"),
    ("the answer is", None),
    ("no numbers here", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_answer_with_a_pattern_has_no_fallback():
    assert extract_answer("so the choice is (B) 12", r"\(([A-D])\)") == "B"
    assert extract_answer("x 12 y 13", r"\d+") == "12"  # no group: the whole first match
    assert extract_answer("The answer is 4.", r"\(([A-D])\)") is None


# --------------------------------------------------------------------------- self-consistency


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_first_appearance():
    assert majority_vote(["7", "8", None, "8", "7"]) == ("7", {"7": 2, "8": 2})
    answer, counts = majority_vote(["a", "b", None, "b"])
    assert answer == "b" and list(counts.items()) == [("b", 2), ("a", 1)]
    assert majority_vote([None, None]) == (None, {})


class FakeGenerator:
    """Returns fixed paths and records how it was asked."""

    def __init__(self, texts: list[str]):
        self.texts, self.calls = texts, []

    def complete(self, prompts, params, *, stop=()):
        self.calls.append((prompts, params, stop))
        return [SimpleNamespace(text=t) for t in self.texts]


def test_self_consistency_votes_over_the_extracted_answers():
    paths = ["3 and 4 make 7. The answer is 7.", "It is 8, the answer is 8.", "no idea",
             "3 plus 4 is 7", "The answer is 8.", "The answer is 8."]
    fake = FakeGenerator(paths)
    params = SamplingParams(temperature=0.7, n=6)
    vote = self_consistency(fake, "Q: 3+4?\nA:", params)
    assert (vote.answer, vote.counts) == ("8", {"8": 3, "7": 2})
    assert vote.paths == paths and vote.answers == ["7", "8", None, "7", "8", "8"]
    assert vote.agreement == pytest.approx(3 / 6)
    assert fake.calls == [(["Q: 3+4?\nA:"], params, ["\n\n"])]
    custom = self_consistency(fake, "p", params, extract=lambda text: "has 8" if "8" in text else None)
    assert (custom.answer, custom.counts, custom.agreement) == ("has 8", {"has 8": 3}, 0.5)


def test_self_consistency_refuses_identical_greedy_paths():
    with pytest.raises(GenerationError, match="temperature > 0"):
        self_consistency(FakeGenerator(["x"]), "p", SamplingParams(temperature=0.0, n=5))
    assert self_consistency(FakeGenerator(["The answer is 1."]), "p", SamplingParams(temperature=0.0)).answer == "1"


def test_self_consistency_end_to_end_on_a_tiny_model(generator):
    prompt = chain_of_thought_prompt("what is 2 plus 5?", EXAMPLES[:2])
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=6, seed=0)
    vote = self_consistency(generator, prompt, params)
    assert len(vote.paths) == 6 and len(set(vote.paths)) > 1  # sampling gives different paths
    assert vote.answers == [extract_answer(p) for p in vote.paths]
    _check_tally(vote)
    assert self_consistency(generator, prompt, params) == vote  # seeded: the same paths and vote
    assert self_consistency(generator, prompt, SamplingParams(max_new_tokens=12, n=6, seed=1)).paths != vote.paths

    # a coarse answer makes paths agree, so the winner is decided by the counts
    coarse = self_consistency(generator, prompt, params, extract=lambda text: str(len(text) % 3))
    assert coarse.paths == vote.paths and sum(coarse.counts.values()) == 6 and len(coarse.counts) < 6
    _check_tally(coarse)


def _check_tally(vote: Vote) -> None:
    """The counts are the answers' tally, most frequent first, and the winner is the earliest top answer."""
    assert vote.counts == Counter(a for a in vote.answers if a is not None)
    assert list(vote.counts.values()) == sorted(vote.counts.values(), reverse=True)
    top = max(vote.counts.values(), default=0)
    assert vote.answer == next((a for a in vote.answers if a is not None and vote.counts[a] == top), None)


# --------------------------------------------------------------------------- tree of thoughts


class Arithmetic:
    """Reach `target` from `start` with the moves "+1" and "*3"; overshooting is a dead end.

    The score is minus the distance to the target, so the greedy first move from 2 to 10 is *3
    (6 is closer than 3), after which only +1 steps remain: 10 needs 2 +1 *3 +1.
    """

    def __init__(self, start: int = 2, target: int = 10):
        self.start, self.target, self.proposed = start, target, []

    def value(self, state: State) -> int:
        v = self.start
        for move in state:
            v = v + int(move[1:]) if move[0] == "+" else v * int(move[1:])
        return v

    def propose(self, state: State) -> list[str]:
        self.proposed.append(state)
        return [m for m in ("+1", "*3") if self.value((*state, m)) <= self.target]

    def score(self, state: State) -> float:
        return -abs(self.target - self.value(state))

    def is_solution(self, state: State) -> bool:
        return self.value(state) == self.target


def test_greedy_fails_where_a_wider_beam_succeeds():
    greedy = tree_of_thoughts(Arithmetic(), breadth=1, max_depth=3)
    assert not greedy.solved and greedy.thoughts[0] == "*3"
    beam = tree_of_thoughts(Arithmetic(), breadth=2, max_depth=3)
    assert beam.solved and beam.thoughts == ("+1", "*3", "+1") and beam.score == 0


def test_lookahead_changes_the_first_choice():
    thinker = Arithmetic()
    result = tree_of_thoughts(thinker, breadth=1, max_depth=3, lookahead=1)
    assert result.solved and result.thoughts == ("+1", "*3", "+1")
    # proposals and scores are memoised: each state is expanded once even though look-ahead visits it first
    assert thinker.proposed == result.expanded and len(set(result.expanded)) == len(result.expanded)


def test_lookahead_stops_at_max_depth():
    # within 2 steps 10 is unreachable (best: 2 *3 +1 = 7 or 2 +1 *3 = 9), so a look-ahead past the
    # depth limit would be the only way to see it; the best state within reach is returned
    result = tree_of_thoughts(Arithmetic(), breadth=1, max_depth=2, lookahead=5)
    assert not result.solved and result.thoughts == ("+1", "*3") and result.score == -1
    assert all(len(s) < 2 for s in result.expanded)


def test_dfs_backtracks_out_of_the_greedy_branch():
    result = tree_of_thoughts(Arithmetic(), strategy="dfs", breadth=2, max_depth=3)
    assert result.solved and result.thoughts == ("+1", "*3", "+1")
    assert result.expanded == [(), ("*3",), ("*3", "+1"), ("+1",), ("+1", "*3")]
    assert not tree_of_thoughts(Arithmetic(), strategy="dfs", breadth=1, max_depth=3).solved  # no sibling to try


class Table:
    """A tree written out: children and scores by state; "win" thoughts are solutions."""

    def __init__(self, children: dict[State, list[str]], scores: dict[str, float]):
        self.children, self.scores = children, scores

    def propose(self, state: State) -> list[str]:
        return self.children.get(state, [])

    def score(self, state: State) -> float:
        return self.scores[state[-1]]

    def is_solution(self, state: State) -> bool:
        return bool(state) and state[-1].startswith("win")


TREE = Table({(): ["a", "b", "c"], ("a",): ["a1", "a2"], ("b",): ["win_b"], ("c",): ["win_c"]},
             {"a": 0.9, "b": 0.5, "c": 0.1, "a1": 0.2, "a2": 0.3, "win_b": 0.8, "win_c": 1.0})


def test_dfs_prunes_children_under_the_threshold():
    full = tree_of_thoughts(TREE, strategy="dfs", max_depth=3)
    assert full.thoughts == ("b", "win_b")
    assert full.expanded == [(), ("a",), ("a", "a2"), ("a", "a1"), ("b",)]  # best child first, then backtrack
    pruned = tree_of_thoughts(TREE, strategy="dfs", max_depth=3, prune_below=0.25)
    assert pruned.thoughts == ("b", "win_b") and pruned.expanded == [(), ("a",), ("a", "a2"), ("b",)]
    # with every child of the root pruned there is nothing left to search
    assert not tree_of_thoughts(TREE, strategy="dfs", max_depth=3, prune_below=0.95).solved


def test_bfs_returns_the_best_valued_solution_of_the_first_solved_depth():
    result = tree_of_thoughts(TREE, breadth=3, max_depth=3)
    assert result.thoughts == ("c", "win_c") and result.score == 1.0 and result.solved
    narrow = tree_of_thoughts(TREE, breadth=2, max_depth=3)  # c is cut from the beam: b's solution it is
    assert narrow.thoughts == ("b", "win_b")


def test_an_expansion_budget_ends_the_search_with_the_best_state_seen():
    result = tree_of_thoughts(Arithmetic(), breadth=2, max_depth=3, max_expansions=1)
    assert result.expanded == [()] and not result.solved and result.thoughts == ("*3",) and result.score == -4


@pytest.mark.parametrize("kwargs, field", [({"strategy": "astar"}, "strategy"), ({"breadth": 0}, "breadth"),
                                           ({"max_depth": 0}, "max_depth"), ({"lookahead": -1}, "lookahead")])
def test_bad_search_settings_are_named(kwargs, field):
    with pytest.raises(GenerationError, match=field):
        tree_of_thoughts(Arithmetic(), **kwargs)


def test_model_thinker_scores_by_the_expected_verdict(generator):
    thinker = ModelThinker(generator, "Reach 10 from 2 with +1 and *3.", SamplingParams())
    state = ("2 +1 = 3",)
    prompt = VALUE_TEMPLATE.format(problem=thinker.problem, steps="2 +1 = 3")
    context, tok = generator.encode(prompt), generator.tokenizer
    words = [tok.encode(" " + w) for w in VALUE_WORDS]
    # scoring a word apart from the prompt assumes the BPE splits the joined text at the same place
    assert all(context + w == tok.encode(prompt + tok.decode(w)) for w in words)
    probs = torch.softmax(torch.tensor(sequence_logprobs(generator.engine.model, context, words)), dim=0)
    expected = sum(p * v for p, v in zip(probs.tolist(), VALUE_WORDS.values()))
    assert thinker.score(state) == pytest.approx(expected)
    assert min(VALUE_WORDS.values()) < thinker.score(state) < max(VALUE_WORDS.values())
    assert sum(thinker.verdicts(state).values()) == pytest.approx(1.0)


def test_model_thinker_drives_the_search_end_to_end(generator):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=0)
    thinker = ModelThinker(generator, "Reach 10 from 2 with +1 and *3.", params, n_proposals=2)
    proposals = thinker.propose(())
    assert proposals and len(set(proposals)) == len(proposals)
    assert all(p and p == p.strip() and "\n" not in p for p in proposals)

    result = tree_of_thoughts(thinker, breadth=2, max_depth=2)
    assert result.expanded[0] == () and any(len(s) == 1 for s in result.expanded)  # it searched to depth 2
    assert result.thoughts and not result.solved  # a random model never writes "The answer is"
    assert math.isfinite(result.score) and result.score == pytest.approx(thinker.score(result.thoughts))
    for i, thought in enumerate(result.thoughts):  # every step is one of the proposals for its prefix
        assert thought in thinker.propose(result.thoughts[:i])
    assert tree_of_thoughts(thinker, breadth=2, max_depth=2) == result  # seeded proposals: the same search

    first_step_solves = ModelThinker(generator, "anything", params, is_solution=lambda s: len(s) == 1)
    assert tree_of_thoughts(first_step_solves, max_depth=3).solved


def test_model_thinker_errors_are_clear(generator):
    with pytest.raises(GenerationError, match="context window"):
        ModelThinker(generator, "x" * 2000, SamplingParams()).score(())
    with pytest.raises(GenerationError, match=re.escape("only {problem} and {steps}")):
        ModelThinker(generator, "p", SamplingParams(), value_template="{problem} {answer}")
    with pytest.raises(GenerationError, match="n_proposals"):
        ModelThinker(generator, "p", SamplingParams(), n_proposals=0)
