"""`llmlab generate` and `llmlab chat` on a tiny checkpoint written in the test."""

from __future__ import annotations

import io
import json

import pytest
import torch

from llmlab.cli import main
from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import save_model
from llmlab.tokenizer import train_bpe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tok = train_bpe([f"def f{i}(x): return x * {i}  # the value" for i in range(300)], vocab_size=300)
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                    max_seq_len=48))
    save_model(model, folder)
    tok.save(folder)
    return folder


def run_json(capsys, *args) -> dict:
    assert main(["generate", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_output_has_every_completion_and_usage(checkpoint, capsys):
    out = run_json(capsys, checkpoint, "--prompt", "def f1", "--prompt", "return", "-n", "2", "--seed", "3",
                   "--max-new-tokens", "6", "--logprobs", "2")
    assert [(c["prompt_index"], c["index"]) for c in out["completions"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for c in out["completions"]:
        assert len(c["token_ids"]) <= 6 and len(c["logprobs"]) == len(c["token_ids"])
        assert all(len(t) == 2 for t in c["top_logprobs"])
    assert out["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in out["completions"])
    again = run_json(capsys, checkpoint, "--prompt", "def f1", "--prompt", "return", "-n", "2", "--seed", "3",
                     "--max-new-tokens", "6", "--logprobs", "2")
    assert [c["text"] for c in again["completions"]] == [c["text"] for c in out["completions"]]


def test_one_prompt_streams_text(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "def f2", "--temperature", "0", "--max-new-tokens",
                 "5"]) == 0
    streamed = capsys.readouterr().out
    out = run_json(capsys, checkpoint, "--prompt", "def f2", "--temperature", "0", "--max-new-tokens", "5")
    assert streamed == "def f2" + out["completions"][0]["text"] + "\n"


def test_beam_search_from_the_cli(checkpoint, capsys):
    out = run_json(capsys, checkpoint, "--prompt", "def", "--num-beams", "3", "-n", "2", "--max-new-tokens", "4")
    scores = [c["score"] for c in out["completions"]]
    assert len(scores) == 2 and scores[0] >= scores[1]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--temperature", "-1"], "temperature must be a number >= 0"),
    (["--prompt", "x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", ""], "a prompt is empty"),
    ([], "give a prompt"),
    (["--prompt", "def " * 60], "but the context window is 48"),
    (["--prompt", "x", "--stop", ""], "stop string must not be empty"),
    (["--prompt", "x", "--prompt-file", "/nonexistent/prompts.txt"], "/nonexistent/prompts.txt"),
])
def test_bad_input_is_one_clear_error(checkpoint, capsys, args, message):
    assert main(["generate", str(checkpoint), *args]) == 1
    assert message in capsys.readouterr().err


def test_truncate_makes_a_long_prompt_fit(checkpoint, capsys):
    out = run_json(capsys, checkpoint, "--prompt", "def " * 60, "--truncate", "--max-new-tokens", "4",
                   "--temperature", "0")
    assert len(out["completions"][0]["token_ids"]) == 4


def test_missing_tokenizer_is_explained(checkpoint, tmp_path, capsys):
    torch.manual_seed(0)
    save_model(build_model(LlamaConfig(vocab_size=300, dim=32, n_layers=1, n_heads=4, hidden_dim=64)), tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 1
    assert "has no tokenizer.json; pass --tokenizer" in capsys.readouterr().err
    out = run_json(capsys, tmp_path, "--tokenizer", checkpoint, "--prompt", "x", "--max-new-tokens", "2")
    assert len(out["completions"]) == 1


@pytest.mark.parametrize("leave", ["/exit", "/quit"])
def test_chat_reads_turns_from_stdin(checkpoint, capsys, monkeypatch, leave):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"hello\n/reset\nagain\n{leave}\nnot read\n"))
    assert main(["chat", str(checkpoint), "--system", "Be brief.", "--max-new-tokens", "5", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and "(history cleared)" in out


def test_chat_with_an_unknown_template_is_an_error(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(checkpoint), "--template", "nope"]) == 1
    assert "chat template 'nope' is neither a built-in (llmlab, chatml" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_decoding_from_the_cli_gives_the_eager_tokens(checkpoint, capsys):
    args = [checkpoint, "--prompt", "def f1", "--prompt", "return x", "--temperature", "0", "--max-new-tokens", "8"]
    eager = run_json(capsys, *args)
    compiled = run_json(capsys, *args, "--compile")
    assert [c["token_ids"] for c in compiled["completions"]] == [c["token_ids"] for c in eager["completions"]]


@pytest.fixture(scope="module")
def encoder_decoder(tmp_path_factory):
    from llmlab.models import T5Config

    folder = tmp_path_factory.mktemp("t5")
    tok = train_bpe([f"def f{i}(x): return x * {i}  # the value" for i in range(300)], vocab_size=300)
    torch.manual_seed(0)
    model = build_model(T5Config(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, head_dim=8, hidden_dim=64,
                                 max_seq_len=24, max_target_len=10, eos_id=tok.eos_id, dropout=0.0))
    save_model(model, folder)
    tok.save(folder)
    return folder


def test_an_encoder_decoder_generates_from_the_cli(encoder_decoder, capsys):
    from llmlab.generate import SamplingParams
    from llmlab.generate.engine import Engine
    from llmlab.models.io import load_model
    from llmlab.tokenizer import load_tokenizer

    out = run_json(capsys, encoder_decoder, "--prompt", "def f1(x):", "--prompt", "return", "--temperature", "0")
    tok = load_tokenizer(encoder_decoder)
    want = Engine(load_model(encoder_decoder)).generate(
        [tok.encode("def f1(x):", eos=True), tok.encode("return", eos=True)],  # T5's input ends with EOS
        SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[tok.eos_id]))
    assert [c["token_ids"] for c in out["completions"]] == [c.token_ids for c in want]
    assert all(len(c["token_ids"]) <= 10 for c in out["completions"])  # the decoder's own limit, not the input's
    assert main(["generate", str(encoder_decoder), "--prompt", "x", "--max-new-tokens", "11"]) == 1
    assert "more than the decoder's limit (max_target_len) of 10 tokens" in capsys.readouterr().err
    beams = run_json(capsys, encoder_decoder, "--prompt", "def", "--num-beams", "3", "--max-new-tokens", "4")
    assert len(beams["completions"][0]["token_ids"]) <= 4


def test_an_encoder_cannot_generate_or_serve(tmp_path, capsys):
    from llmlab.models import BertConfig

    bert = tmp_path / "bert"
    save_model(build_model(BertConfig(vocab_size=300, dim=16, n_layers=1, n_heads=2, max_seq_len=16)), bert)
    train_bpe(["some text to learn from"] * 20, vocab_size=280).save(bert)
    assert main(["generate", str(bert), "--prompt", "x"]) == 1
    assert "an encoder (family=bert, head=mlm); generation takes decoder models or encoder-decoder" in \
        capsys.readouterr().err
    assert main(["serve", str(bert), "--port", "65431"]) == 1
    assert "an encoder (family=bert, head=mlm); llmlab serve takes decoder models or encoder-decoder models" in \
        capsys.readouterr().err


def test_a_run_directory_generates_with_its_newest_checkpoint(checkpoint, tmp_path, capsys):
    import shutil

    shutil.copytree(checkpoint, tmp_path / "run" / "checkpoints" / "step-00000010")
    args = ["--prompt", "def f1", "--temperature", "0", "--max-new-tokens", "5"]
    want = run_json(capsys, checkpoint, *args)["completions"]
    assert run_json(capsys, tmp_path / "run", *args)["completions"] == want
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 1
    assert "not a checkpoint (no config.json) nor a run directory" in capsys.readouterr().err
