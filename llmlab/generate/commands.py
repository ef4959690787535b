"""`llmlab generate` and `llmlab chat`: arguments and what they run."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llmlab.common import LlmlabError, choose_device, style
from llmlab.generate.sampling import GenerationError, SamplingParams
from llmlab.generate.text import ChatSession, TextGenerator


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (llmlab or HF format), or a run directory (its final/ "
                   "model, else its newest checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.add_argument("--bos", action="store_true",
                   help="start every prompt with the BOS token (default: when the tokenizer's config says "
                        "add_bos_token, as for a model trained with BOS before every document)")


def add_sampling_arguments(p: argparse.ArgumentParser, default_max_new_tokens: int) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens per completion, at most the context window (default: {default_max_new_tokens}, "
                        "or the context window when smaller)")
    p.set_defaults(default_max_new_tokens=default_max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (CTRL)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="minus this x the token's count so far")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="minus this once a token has appeared")
    g.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step (CPU): several times faster on small models, after a "
                        "compilation of tens of seconds")


def sampling_params(ns: argparse.Namespace, limit: tuple[int, str] | None = None, **extra) -> SamplingParams:
    """The decoding options as SamplingParams, checked (without a model: before it loads; with the
    model's output `limit` (tokens, what sets it): --max-new-tokens then defaults to what fits and may
    not exceed it).

    Raises:
        GenerationError: naming the first option out of range.
    """
    max_new = ns.max_new_tokens
    if max_new is None:
        max_new = ns.default_max_new_tokens if limit is None else min(ns.default_max_new_tokens, limit[0])
    elif limit is not None and max_new > limit[0]:
        raise GenerationError(f"--max-new-tokens {max_new} is more than {limit[1]} of {limit[0]} tokens")
    params = SamplingParams(max_new_tokens=max_new, temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p,
                            min_p=ns.min_p, repetition_penalty=ns.repetition_penalty,
                            frequency_penalty=ns.frequency_penalty, presence_penalty=ns.presence_penalty,
                            seed=ns.seed, **extra)
    params.validate()
    if any(s == "" for s in ns.stop):
        raise GenerationError("--stop: a stop string must not be empty")
    return params


def load_generator(ns: argparse.Namespace, kinds: tuple[str, ...] = ("decoder", "encoder-decoder"),
                   what: str = "generation") -> TextGenerator:
    """The checkpoint and tokenizer the arguments name, as a TextGenerator; a model of another kind
    than `kinds` is refused before its weights load."""
    from llmlab.data.ingest import check_input
    from llmlab.models import require_kind
    from llmlab.models.io import load_model, read_config, resolve_model_dir
    from llmlab.tokenizer import load_tokenizer

    device = choose_device(ns.device, label="--device")
    check_input(Path(ns.checkpoint), folders=True)
    checkpoint = resolve_model_dir(ns.checkpoint)  # a run directory: its final/ model, else newest checkpoint
    if checkpoint != Path(ns.checkpoint):
        print(style(f"{ns.checkpoint}: using {checkpoint}", "2"), file=sys.stderr, flush=True)
    ns.checkpoint = str(checkpoint)
    source = Path(ns.tokenizer or ns.checkpoint)
    if ns.tokenizer is None and not (source / "tokenizer.json").is_file():
        raise LlmlabError(f"{source} has no tokenizer.json; pass --tokenizer PATH")
    require_kind(read_config(checkpoint)[0], kinds, what, str(checkpoint))
    tokenizer = load_tokenizer(source)
    model = load_model(ns.checkpoint, device).eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise LlmlabError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                          f"{model.config.vocab_size}; is --tokenizer the model's own?")
    return TextGenerator(model, tokenizer, add_bos=ns.bos or tokenizer.add_bos, compile=getattr(ns, "compile", False))


def run_generate(ns: argparse.Namespace) -> None:
    prompts = list(ns.prompt)
    if ns.prompt_file:
        try:
            lines = [line for line in Path(ns.prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise LlmlabError(f"--prompt-file {ns.prompt_file}: cannot read it as UTF-8 text: {e}") from None
        if not lines:
            raise LlmlabError(f"--prompt-file {ns.prompt_file}: holds no prompt (every line is blank)")
        prompts += lines
    if not prompts:
        raise LlmlabError("give a prompt with --prompt TEXT or --prompt-file FILE")
    if any(p == "" for p in prompts):
        raise LlmlabError("--prompt: a prompt is empty; give some text")
    extra = dict(n=ns.n, num_beams=ns.num_beams, length_penalty=ns.length_penalty, logprobs=ns.logprobs)
    sampling_params(ns, **extra)  # bad options fail before the model loads
    generator = load_generator(ns)
    params = sampling_params(ns, generator.output_limit, **extra)
    engine = generator.engine
    params.validate(engine.vocab_size)
    engine.check([generator.encode(p) for p in prompts], params, ns.truncate)  # before anything is printed
    t0 = time.perf_counter()
    if not ns.json and len(prompts) == 1 and ns.n == 1 and ns.num_beams == 1:
        # a decoder continues the prompt; an encoder-decoder's output is a text of its own, on its own line
        print(style(prompts[0], "2"), end="\n" if engine.encoder_decoder else "", flush=True)
        for delta in generator.stream(prompts[0], params, stop=ns.stop, truncate=ns.truncate):
            print(delta.text, end="", flush=True)
        print()
        return
    completions = generator.complete(prompts, params, stop=ns.stop, truncate=ns.truncate)
    elapsed = time.perf_counter() - t0
    if ns.json:
        generated = sum(len(c.token_ids) for c in completions)
        print(json.dumps({
            "checkpoint": str(ns.checkpoint),
            "completions": [{"prompt_index": c.prompt_index, "index": c.sample_index, "prompt": prompts[c.prompt_index],
                             "text": c.text, "finish_reason": c.finish_reason, "token_ids": c.token_ids,
                             "logprobs": c.logprobs, "top_logprobs": c.top_logprobs, "score": c.score}
                            for c in completions],
            "usage": {"prompt_tokens": sum(c.prompt_tokens for c in completions if c.sample_index == 0),
                      "completion_tokens": generated},
            "seconds": round(elapsed, 3),
            "tokens_per_s": round(generated / elapsed, 1) if elapsed > 0 else None,
        }, ensure_ascii=False))
        return
    for c in completions:
        tag = f"[prompt {c.prompt_index}, completion {c.sample_index}, {c.finish_reason}"
        tag += f", score {c.score:.3f}]" if c.score is not None else "]"
        print(style(tag, "2"))
        print(style(prompts[c.prompt_index], "2") + c.text)


def run_chat(ns: argparse.Namespace) -> None:
    from llmlab.tokenizer.chat import load_chat_template

    sampling_params(ns)  # bad options fail before the model loads
    generator = load_generator(ns)
    template = load_chat_template(ns.checkpoint, ns.template)
    session = ChatSession(generator, template, sampling_params(ns, generator.output_limit), system=ns.system,
                          stop=ns.stop)
    interactive = sys.stdin.isatty()
    if interactive:
        print(style(f"chat with {ns.checkpoint} ({template.name} template, context {generator.context} tokens); "
                    "/reset clears the history, /exit (or /quit, or Ctrl-D) quits", "2"))
    while True:
        if interactive:
            print(style("you> ", "1"), end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/reset":
            session.reset()
            print(style("(history cleared)", "2"))
            continue
        reply = session.send(line)
        first = next(reply, None)  # the template renders here: an error comes before the prompt marker
        print(style("assistant> ", "1"), end="", flush=True)
        if first is not None:
            print(first.text, end="", flush=True)
        for delta in reply:
            print(delta.text, end="", flush=True)
        print()
