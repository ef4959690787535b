"""`llmlab eval` on encoders and encoder-decoders: T5's log-likelihoods and generations, a masked
LM's pseudo-log-likelihoods and fill-mask predictions (each against a direct computation), and
task files scored by fine-tuned heads with the numbers fine-tuning itself reported."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.cli import main
from llmlab.config import from_dict
from llmlab.data.tasks import QAExample
from llmlab.eval.encoders import EncoderLM, Seq2SeqLM
from llmlab.eval.heads import Row, TaskRows, predict_answers
from llmlab.eval.lm import EvalError, LocalLM
from llmlab.eval.run import EvalConfig
from llmlab.eval.run import run as evaluate
from llmlab.models.io import load_model
from llmlab.tokenizer import load_tokenizer
from llmlab.train.finetune import FinetuneConfig
from llmlab.train.finetune import run as finetune


def _eval(model, tmp_path, *tasks, **more) -> dict:
    cfg = from_dict(EvalConfig, {"tasks": list(tasks), "out_dir": str(tmp_path / "ev"), "bootstrap_iters": 0, **more})
    results = evaluate(cfg, [str(model)], quiet=True)
    return {(r["task"], r["metric"]): r["value"] for r in results["rows"]}


# --------------------------------------------------------------------------- T5


@torch.no_grad()
def test_t5_scores_a_continuation_after_its_input(t5_base):
    lm = LocalLM.from_path(t5_base, batch_size=3)
    assert isinstance(lm, Seq2SeqLM)
    tok, model = lm.tokenizer, lm.model
    requests = [("translate: the cat", " le chat"), ("a", " b c d"), ("translate: the cat", " la"),
                ("longer input text here", " x")]
    got = lm.loglikelihood(requests)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        source = torch.tensor([tok.encode(ctx) + [tok.eos_id]])
        target = torch.tensor([tok.encode(cont) + [tok.eos_id]])  # the answer and its end, as the harness scores
        logits = model(source, decoder_input_ids=model.shift_right(target)).float().log_softmax(-1)[0]
        want = logits.gather(-1, target[0][:, None]).sum()
        assert ll == pytest.approx(float(want), abs=1e-4)  # batched with padding = alone
        assert greedy == bool((logits.argmax(-1) == target[0]).all())


@torch.no_grad()
def test_t5_scores_a_long_text_in_pieces_each_after_the_text_before_it(t5_base):
    lm = LocalLM.from_path(t5_base)
    text = " ".join(["the cat sat on the mat and then it ran"] * 12)
    ids = lm.encode(text)
    assert len(ids) > 2 * lm.max_length  # three or more pieces of max_target_len
    model, eos, n = lm.model, lm.eos, lm.max_length
    want = 0.0
    for start in range(0, len(ids), n):
        source = torch.tensor([(ids[:start])[-(lm.source_len - 1):] + [eos]])
        target = torch.tensor([ids[start:start + n]])
        logp = model(source, decoder_input_ids=model.shift_right(target)).float().log_softmax(-1)[0]
        want += float(logp.gather(-1, target[0][:, None]).sum())
    assert lm.loglikelihood_rolling([text])[0] == pytest.approx(want, abs=1e-3)


def test_t5_generation_follows_the_generate_verb(t5_base):
    from llmlab.generate import SamplingParams
    from llmlab.generate.text import TextGenerator

    lm = LocalLM.from_path(t5_base, batch_size=2)
    prompts = ["translate: the red cat", "translate: a dog", "translate: one blue bird sings"]
    got = lm.generate_until([(p, {"until": [], "max_gen_toks": 12, "temperature": 0.0}) for p in prompts])
    generator = TextGenerator(load_model(t5_base), load_tokenizer(t5_base))
    want = generator.complete(prompts, SamplingParams(max_new_tokens=12, temperature=0.0,
                                                      stop_token_ids=[generator.tokenizer.eos_id]))
    assert got == [c.text for c in want]


# --------------------------------------------------------------------------- masked LM


@torch.no_grad()
def test_pseudo_log_likelihood_masks_each_token_in_turn(bert_base):
    lm = LocalLM.from_path(bert_base, batch_size=5)
    assert isinstance(lm, EncoderLM)
    model, tok = lm.model, lm.tokenizer
    requests = [("the movie was", " great fun"), ("", "a plot"), ("it", " was dull and slow")]
    got = lm.loglikelihood(requests)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        c, x = tok.encode(ctx), tok.encode(cont)
        row = [tok.cls_id, *c, *x, tok.sep_id]
        want, hits = 0.0, True
        for j in range(len(x)):
            masked = list(row)
            masked[1 + len(c) + j] = tok.mask_id
            logp = model(torch.tensor([masked]))[0, 1 + len(c) + j].float().log_softmax(-1)
            want += float(logp[x[j]])
            hits = hits and int(logp.argmax()) == x[j]
        assert ll == pytest.approx(want, abs=1e-4) and greedy == hits


@torch.no_grad()
def test_fill_mask_predicts_the_masked_word_from_both_sides(bert_base):
    lm = LocalLM.from_path(bert_base)
    model, tok = lm.model, lm.tokenizer
    text = "the plot was [MASK] and the acting fine"
    for answer in ("dull", "wonderfully"):  # one token, and a word the vocabulary splits
        got = lm.fill_mask([(text, answer)], ["doc"])[0]
        ids = tok.encode(text.replace("[MASK]", answer))
        start = len(tok.encode("the plot was"))
        span = list(range(start, start + len(tok.encode(answer))))
        row = [tok.cls_id, *ids, tok.sep_id]
        for i in span:
            row[i + 1] = tok.mask_id
        logits = model(torch.tensor([row]))[0, [i + 1 for i in span]]
        want = [ids[i] for i in span]
        assert got["acc"] == float(logits.argmax(-1).tolist() == want)
        assert got["acc_top5"] == float(all(w in t for w, t in zip(want, logits.topk(5).indices.tolist())))
    with pytest.raises(EvalError, match="does not generate text"):
        lm.generate_until([("x", {})])


def test_an_encoder_is_scored_on_the_builtin_cloze_and_fill_mask(bert_base, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", str(bert_base), "tasks=[pydoc-cloze,pydoc-fill-mask]", "limit=4", f"out_dir={out}",
                 "bootstrap_iters=0"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["task"], r["metric"]) for r in rows} >= {("pydoc-cloze", "acc"), ("pydoc-fill-mask", "acc"),
                                                        ("pydoc-fill-mask", "acc_top5")}
    assert all(0 <= r["value"] <= 1 for r in rows if r["metric"].startswith("acc"))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all("[MASK]" in s["context"] and "prediction" in s for s in samples if s["task"] == "pydoc-fill-mask")


# --------------------------------------------------------------------------- task files


def _finetune(base, out, task, train, val, **more) -> dict:
    return finetune(from_dict(FinetuneConfig, {
        "task": task, "base": str(base), "out_dir": str(out),
        "data": {"train": str(train), "val": str(val), **more.pop("data", {})},
        "peft": "none", "batch_size": 8, "max_steps": 6, "optim": {"lr": 3e-3, "warmup_steps": 1},
        "eval": {"every": 6, "batches": 2}, "system": {"autocast": "none"}, **more}))


CASES = {  # case: (task, set, train file, val file, {finetune's score: eval's metric}, more settings)
    "classify": ("classify", "sentiment", "train.tsv", "val.tsv", {"accuracy": "acc", "macro_f1": "f1"}, {}),
    "tokens": ("tokens", "ner", "train.conll", "val.conll", {"entity_f1": "entity_f1",
                                                              "tag_accuracy": "tag_accuracy"}, {}),
    "span": ("span", "qa", "train.json", "val.json", {"exact_match": "exact_match", "f1": "f1"}, {}),
    # contexts of several windows: eval frames them as fine-tuning did (task.json)
    "span-windows": ("span", "qa", "train.json", "val.json", {"exact_match": "exact_match", "f1": "f1"},
                     {"seq_len": 32, "data": {"doc_stride": 6}}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_fine_tuned_head_scores_its_task_file_as_fine_tuning_did(case, sets, bert_base, tmp_path):
    task, name, train, val, metrics, more = CASES[case]
    result = _finetune(bert_base, tmp_path / "run", task, sets / name / train, sets / name / val, **more)
    got = _eval(tmp_path / "run", tmp_path, f"{task}:{sets / name / val}")
    for theirs, ours in metrics.items():
        assert got[(f"{task}:{val}", ours)] == pytest.approx(result["metrics"][theirs], abs=1e-9)


def test_t5_scores_a_seq2seq_file_as_fine_tuning_did(sets, t5_base, tmp_path):
    val = sets / "translate" / "val.jsonl"
    result = _finetune(t5_base, tmp_path / "run", "seq2seq", sets / "translate" / "train.jsonl", val)
    got = _eval(tmp_path / "run" / "final", tmp_path, f"seq2seq:{val}")
    assert got[("seq2seq:val.jsonl", "exact_match")] == pytest.approx(result["metrics"]["exact_match"])
    assert got[("seq2seq:val.jsonl", "bleu")] == pytest.approx(result["metrics"]["bleu"])
    assert {"rouge1", "rouge2", "rougeL"} <= {m for _, m in got}


def test_language_models_answer_task_files_without_a_head(sets, bert_base, t5_base, tmp_path):
    """A masked LM picks a label by pseudo-log-likelihood; T5 by log-likelihood, and answers QA by
    generating after the QA prompt."""
    sentiment, qa = sets / "sentiment" / "val.tsv", sets / "qa" / "val.json"
    got = _eval(bert_base, tmp_path / "b", f"classify:{sentiment}", limit=6)
    assert 0 <= got[("classify:val.tsv", "acc")] <= 1
    got = _eval(t5_base, tmp_path / "t", f"classify:{sentiment}", f"span:{qa}", limit=4)
    assert 0 <= got[("span:val.json", "f1")] <= 1 and ("classify:val.tsv", "f1") in got


def test_task_files_refuse_a_model_that_cannot_answer_them(sets, bert_base, t5_base, tmp_path, capsys):
    classifier = tmp_path / "run"
    _finetune(bert_base, classifier, "classify", sets / "sentiment" / "train.tsv", sets / "sentiment" / "val.tsv")
    cases = [
        (classifier, f"tokens:{sets / 'ner' / 'val.conll'}", "token_classification tasks need an encoder with the "
         f"tokens head of `llmlab finetune task=tokens`; {classifier} has the classify head"),
        (classifier, "pydoc-cloze", f"multiple_choice tasks need an encoder with its masked-LM head; {classifier} "
         "has the classify head"),
        (bert_base, f"seq2seq:{sets / 'translate' / 'val.jsonl'}", "generate_until tasks need a decoder or T5"),
        (bert_base, "synth", "an encoder does not generate text"),
        (t5_base, f"tokens:{sets / 'ner' / 'val.conll'}", f"{t5_base} is an encoder-decoder model"),
        (t5_base, "pydoc-fill-mask", "on task pydoc-fill-mask: fill_mask tasks need an encoder with its masked-LM"),
        (bert_base, "classify:/no/such.tsv", "no such file"),
    ]
    for i, (model, task, message) in enumerate(cases):
        assert main(["eval", str(model), f"tasks=[{task}]", f"out_dir={tmp_path / f'ev{i}'}", "limit=2"]) == 1
        assert message in capsys.readouterr().err, task
        assert not (tmp_path / f"ev{i}").exists()
    labels = classifier / "final" / "labels.json"
    for bad, message in (('["negative", "negative"]', "label 'negative' is listed twice"),
                         ('["negative", "positive", "neutral"]', "lists 3 labels; the model has 2"),
                         (None, "has no labels.json naming its labels")):
        if bad is None:
            labels.unlink()
        else:
            labels.write_text(bad)
        assert main(["eval", str(classifier), f"tasks=[classify:{sets / 'sentiment' / 'val.tsv'}]",
                     f"out_dir={tmp_path / 'evl'}"]) == 1
        assert message in capsys.readouterr().err
    labels.write_text('["negative", "positive"]')
    other = tmp_path / "other.tsv"  # a label the classifier never saw, named with its line
    other.write_text("sentence\tlabel\nfine\tpositive\nodd\tsarcastic\n")
    assert main(["eval", str(classifier), f"tasks=[classify:{other}]", f"out_dir={tmp_path / 'evx'}"]) == 1
    assert f"{other}:3: label 'sarcastic' is not one the model was trained on" in capsys.readouterr().err


# --------------------------------------------------------------------------- long contexts


def test_a_long_context_is_read_in_overlapping_windows(bert_base):
    tok = load_tokenizer(bert_base)
    context = " ".join(f"w{i}" for i in range(40)) + " the answer is here"
    example = QAExample("q1", "where", context, ["answer"], [context.index("answer")])
    rows = TaskRows("span", tok, 24, doc_stride=6).rows([example])
    assert len(rows) > 2 and all(len(r.input_ids) <= 24 for r in rows)
    assert rows[-1].target != (0, 0) and all(r.target == (0, 0) for r in rows[:1])  # the answer is in the last
    # the windows overlap by doc_stride tokens and together cover the whole context
    starts = [next(o for o in r.meta["offsets"] if o is not None)[0] for r in rows]
    assert starts == sorted(starts) and rows[-1].meta["offsets"][-2][1] == len(context)
    logits = [torch.zeros(len(r.input_ids), 2) for r in rows]
    s, e = rows[-1].target
    logits[-1][s, 0] = logits[-1][e, 1] = 5.0
    assert predict_answers(rows, logits, [context], allow_null=True) == ["answer"]
    logits[0][0] = 6.0  # one window's null score is not enough: the smallest of them is compared
    assert predict_answers(rows, logits, [context], allow_null=True) == ["answer"]
    for row in logits:
        row[0] = 6.0  # every window's null score above the best span's: no answer
    assert predict_answers(rows, logits, [context], allow_null=True) == [""]
    assert predict_answers(rows, logits, [context], allow_null=False) == ["answer"]
    assert isinstance(rows[0], Row)


FILL = """task: fill
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: fill_mask
doc_to_text: text
doc_to_target: answer
"""


def test_a_fill_mask_task_file_is_checked_before_any_model_runs(bert_base, tmp_path, capsys):
    data = tmp_path / "fill.jsonl"
    data.write_text(json.dumps({"text": "the movie was [MASK] today", "answer": "great"}) + "\n"
                    + json.dumps({"text": "no mask in this one", "answer": "x"}) + "\n")
    (tmp_path / "fill.yaml").write_text(FILL.format(data=data))
    assert main(["eval", str(bert_base), f"tasks=[{tmp_path / 'fill.yaml'}]", f"out_dir={tmp_path / 'ev'}"]) == 1
    assert f"{data}:2: a fill_mask text must hold [MASK] once" in capsys.readouterr().err
    data.write_text(json.dumps({"text": "the movie was [MASK] today", "answer": "great"}) + "\n")
    got = _eval(bert_base, tmp_path, str(tmp_path / "fill.yaml"))
    assert set(got) == {("fill", "acc"), ("fill", "acc_top5")}


def test_a_prepared_split_is_scored_by_t5_and_a_masked_lm(bert_base, t5_base, tmp_path):
    from llmlab.data.prepare import PrepareConfig
    from llmlab.data.prepare import run as prepare
    from llmlab.data.shards import TokenShards

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"d{i}.txt").write_text(f"Review {i}: the plot was fine and the acting was great fun to watch.\n")
    for model in (bert_base, t5_base):
        data = tmp_path / f"data-{model.name}"
        prepare(PrepareConfig(inputs=[str(docs)], out_dir=str(data), tokenizer=str(model), val_frac=0.3, seed=0))
        cfg = from_dict(EvalConfig, {"tasks": [str(data)], "out_dir": str(tmp_path / model.name),
                                     "bootstrap_iters": 0})
        evaluate(cfg, [str(model)], quiet=True)
        samples = [json.loads(line) for line in (tmp_path / model.name / "samples.jsonl").read_text().splitlines()]
        shards = TokenShards(data, "val")
        assert len(samples) == 1 and len(shards) < 2048  # one document: the whole split, from its start
        lm = LocalLM.from_path(model)
        want = lm.score_tokens([([], shards.get(0, len(shards)).tolist())])[0].logprob
        assert samples[0]["loglikelihood"] == pytest.approx(want, rel=1e-5)


def test_a_fill_mask_answer_the_vocabulary_cannot_spell_is_refused(bert_base):
    lm = LocalLM.from_path(bert_base)
    with pytest.raises(EvalError, match="doc: the answer 'Ωμέγα' has characters the vocabulary lacks"):
        lm.fill_mask([("the plot was [MASK] today", "Ωμέγα")], ["doc"])
