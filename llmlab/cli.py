"""The `llmlab` command: one router; each verb parses its arguments, loads its config and calls
its module's `run`. Errors llmlab can explain exit with status 1 and one clean message."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback
from pathlib import Path

from llmlab import __version__
from llmlab.common import LlmlabError, style

# argparse takes "-7e9" for an option unless told that it looks like a number
_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan|infinity)$", re.IGNORECASE)
OVERWRITE_HELP = ("write into an existing output (a non-empty folder, or a file): llmlab replaces the files it "
                  "writes and leaves everything else there alone")

# verb (or "verb subverb") -> (module, config class, function, one-line help), for verbs driven by
# a YAML config and key=value overrides; the function takes the config and returns a dict
CONFIG_VERBS = {
    "demo": ("llmlab.demo", "DemoConfig", "run", "run the main job on the embedded default"),
    "data prepare": ("llmlab.data.prepare", "PrepareConfig", "run",
                     "clean, deduplicate, split and tokenize a corpus into token shards"),
    "tokenizer train": ("llmlab.data.prepare", "TokenizerTrainConfig", "train_tokenizer",
                        "train a tokenizer on a corpus: byte-level BPE, WordPiece (BERT) or Unigram (T5)"),
    "data synth": ("llmlab.data.synth", "SynthConfig", "run",
                   "write a synthetic instruction set whose answers a program can check"),
    "data tasks": ("llmlab.data.synth_tasks", "TaskSynthConfig", "run",
                   "write a synthetic sentiment, NER, QA, translation or summarisation set for encoders and T5"),
    "data distill": ("llmlab.align.distill", "DistillConfig", "run",
                     "write instruction data from a teacher model: self-instruct rounds, ROUGE-L dedup, unit tests"),
    "pretrain": ("llmlab.train.pretrain", "PretrainConfig", "run", "pretrain a language model from token shards"),
    "finetune": ("llmlab.train.finetune", "FinetuneConfig", "run",
                 "fine-tune a model: full, frozen layers, LoRA or QLoRA, on instructions, chats or raw text; "
                 "encoders and T5 on classification, NER, QA or seq2seq (task=...)"),
    "align": ("llmlab.align.run", "AlignConfig", "run",
              "align a model: reward model, PPO, DPO, IPO or GRPO (method=...), on preference pairs or prompts"),
    "scaling fit": ("llmlab.train.sweep", "ScalingFitConfig", "run",
                    "train a sweep of small models and fit your own scaling law L(N, D)"),
    "scaling moe": ("llmlab.train.moe_vs_dense", "MoEVsDenseConfig", "run",
                    "train a dense model and a mixture of experts of equal active compute; plot loss against FLOPs"),
}


def _config_help(module: str, cls_name: str) -> str:
    from llmlab.config import config_help

    cls = getattr(importlib.import_module(module), cls_name)
    rows = config_help(cls)
    width = max(len(k) for k, _, _, _ in rows)
    return "config keys (set with key=value):\n" + "\n".join(
        f"  {k:{width}s}  {t} = {d}" + (f"  # {c}" if c else "") for k, t, d, c in rows)


def build_parser(argv: list[str] = ()) -> argparse.ArgumentParser:
    """The argument tree. A verb's config-key help imports its module (and torch), so it is built
    only for the verb that `argv` names; `llmlab --help` and other verbs stay fast."""
    parser = argparse.ArgumentParser(prog="llmlab", description="A hackable lab for the whole life of a "
                                     "language model.")
    parser.add_argument("--version", action="version", version=f"llmlab {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (module, cls_name, _, help_text) in CONFIG_VERBS.items():
        verb, _, sub = name.partition(" ")
        parent = verbs
        if sub:  # "data prepare": a verb with its own sub-verbs
            if verb not in groups:
                groups[verb] = verbs.add_parser(verb, help=f"{verb} commands").add_subparsers(
                    dest="sub", metavar="COMMAND", required=True)
            parent = groups[verb]
        requested = [a for a in argv if not a.startswith("-")][:len(name.split())]
        p = parent.add_parser(sub or verb, help=help_text, description=help_text,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=_config_help(module, cls_name) if requested == name.split() else None)
        p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                       help="an optional YAML config, then dotted overrides")
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        p.set_defaults(config_verb=name)

    p = verbs.add_parser("convert", help="convert a checkpoint between llmlab, HF and GGUF formats",
                         description="Convert a checkpoint folder (llmlab or HF format, auto-detected) to an llmlab "
                         "or HF folder, or to a GGUF file for llama.cpp (LLaMA family).")
    p.add_argument("path", help="checkpoint folder to read")
    p.add_argument("--to", required=True, choices=("hf", "llmlab", "gguf"), help="output format")
    p.add_argument("--out", required=True, help="output folder (a .gguf file for --to gguf)")
    p.add_argument("--outtype", choices=("f32", "f16", "q8_0"), default=None,
                   help="GGUF tensor type for matrices (vectors stay f32); default f16")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled pytorch_model.bin weights (read with weights_only=True)")
    p.add_argument("--adapter", metavar="PATH",
                   help="a LoRA adapter in PEFT format (from llmlab finetune or peft) to merge into the weights")

    from llmlab.generate import commands  # light: torch is imported when a verb runs

    p = verbs.add_parser("generate", help="complete text prompts with a checkpoint",
                         description="Complete prompts with a checkpoint; one prompt streams its output.")
    commands.add_model_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-file", help="a file of prompts, one per line")
    p.add_argument("--truncate", action="store_true",
                   help="drop a prompt's oldest tokens to leave room for --max-new-tokens, instead of an error")
    p.add_argument("--json", action="store_true", help="print one JSON object with every completion")
    commands.add_sampling_arguments(p, default_max_new_tokens=128)
    g = p.add_argument_group("completions")
    g.add_argument("-n", "--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = sampling or greedy)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log-prob / length ** this (> 0 favours longer outputs)")
    g.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="report each token's log-probability and the top K alternatives (with --json)")

    from llmlab.plan import commands as plan_commands

    p = verbs.add_parser("plan", help="memory, FLOPs, time, cost and compute-optimal size before training",
                         description="Estimate what training and serving a model takes: parameters, FLOPs, "
                         "inference and training memory, time, cost, energy and CO2 on a hardware catalog, and "
                         "the compute-optimal size for a FLOP budget.")
    plan_commands.add_arguments(p)

    p = verbs.add_parser("chat", help="chat with a checkpoint in the terminal",
                         description="Interactive chat with a checkpoint's chat template; the history is "
                         "trimmed to the context window and replies stream as they are generated.")
    commands.add_model_arguments(p)
    p.add_argument("--system", help="system message")
    p.add_argument("--template", help="chat template: a built-in name (llmlab, chatml, llama3, llama2) or a "
                   "Jinja file (default: the checkpoint's own, else llmlab)")
    commands.add_sampling_arguments(p, default_max_new_tokens=256)

    p = verbs.add_parser("eval", help="evaluate models on tasks: built-in, or lm-evaluation-harness task YAMLs",
                         description="Score one or more models (llmlab checkpoints, run directories, HF folders, or "
                         "OpenAI-compatible servers) on tasks: built-in names, lm-evaluation-harness task YAMLs for "
                         "local data or folders of them, text files (perplexity) or prepared data folders. Writes "
                         "results.json, samples.jsonl and a table.",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=_config_help("llmlab.eval.run", "EvalConfig") if argv[:1] == ["eval"] else None)
    p.add_argument("args", nargs="*", metavar="MODEL ... [key=value ...]",
                   help="checkpoint folders or run directories, then dotted overrides such as tasks=[pydoc-ppl]")
    p.add_argument("--server", action="append", default=[], metavar="URL",
                   help="an OpenAI-compatible server to evaluate, such as http://127.0.0.1:8000/v1 (repeatable)")
    p.add_argument("--server-model", metavar="NAME",
                   help="the model name to ask the servers for (default: their first)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    from llmlab.serve import commands as serve_commands

    p = verbs.add_parser("serve", help="serve a checkpoint behind an OpenAI-compatible HTTP API",
                         description="Serve a checkpoint: /v1/completions, /v1/chat/completions and /v1/models, "
                         "streaming or not, with continuous batching. Binds 127.0.0.1 unless --host says otherwise.")
    serve_commands.add_arguments(p)

    from llmlab.studio import commands as studio_commands

    p = verbs.add_parser("studio", help="the web studio of a workspace: data, model, configure, train live, evaluate, "
                         "chat, deploy; for a team", description="Serve the studio for a workspace (made when "
                         "missing), or manage its accounts with `llmlab studio user ...`. Binds 127.0.0.1 unless "
                         "--host says otherwise.")
    studio_commands.add_arguments(p)
    _numbers_are_not_options(parser)
    return parser


def _numbers_are_not_options(parser: argparse.ArgumentParser) -> None:
    """Let `--params -7e9` reach the validation that explains what is wrong with it."""
    parser._negative_number_matcher = _NUMBER
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _numbers_are_not_options(sub)


def _run_config_verb(verb: str, args: list[str], overwrite: bool) -> int:
    from llmlab.config import load_config

    module, cls_name, function, _ = CONFIG_VERBS[verb]
    mod = importlib.import_module(module)
    path = None
    if args and "=" not in args[0]:
        path, args = args[0], args[1:]
    stray = [a for a in args if "=" not in a]
    if stray:
        raise LlmlabError(f"expected key=value overrides after the config file, got {stray}")
    result = getattr(mod, function)(load_config(getattr(mod, cls_name), path, args), overwrite=overwrite)
    return result.get("exit_code", 0) if isinstance(result, dict) else 0


def _convert(ns: argparse.Namespace) -> None:
    from llmlab.common import atomic_dir, check_output
    from llmlab.models.io import copy_tokenizer_files, load_model, save_hf, save_model, shadowed_weights

    if ns.outtype is not None and ns.to != "gguf":
        raise LlmlabError(f"--outtype {ns.outtype} applies to --to gguf only; --to {ns.to} keeps the weights' "
                          "dtype")
    out = check_output(ns.out, label="--out", inputs=[ns.path, ns.adapter], overwrite=ns.overwrite,
                       folder=ns.to != "gguf")
    model = load_model(ns.path, allow_pickle=ns.allow_pickle)
    if ns.adapter:
        from llmlab.peft import load_adapter, merge_and_unload

        cfg = load_adapter(model, ns.adapter)
        model = merge_and_unload(model)
        print(f"merged LoRA adapter {ns.adapter} (r={cfg.r}, {len(cfg.targets)} layers)")
    if ns.to == "gguf":
        from llmlab.models.gguf import export_gguf

        outtype = ns.outtype or "f16"
        has_tokenizer = (Path(ns.path) / "tokenizer.json").is_file()
        export_gguf(model, ns.path if has_tokenizer else None, out, outtype=outtype)
        print(f"wrote {out} ({outtype}{', with the tokenizer' if has_tokenizer else ', no tokenizer.json found'})")
        return
    pad = None
    if ns.to == "hf" and model.config.num_labels and (Path(ns.path) / "tokenizer.json").is_file():
        from llmlab.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(ns.path)  # a classifier scores the last token before the padding
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    with atomic_dir(out, merge=ns.overwrite) as tmp:
        if ns.to == "hf":
            save_hf(model, tmp, pad_token_id=pad)
        else:
            save_model(model, tmp)
        copied = copy_tokenizer_files(ns.path, tmp)
        shadowed = shadowed_weights(out, tmp)
        if shadowed:
            raise LlmlabError(f"--out {out}: holds {', '.join(shadowed)}, which loaders would read instead of "
                              "the new weights; remove them yourself or choose another folder")
    extra = f" (+ {', '.join(copied)})" if copied else ""
    if ns.to == "hf" and getattr(model.config, "span_boundary_head", False):
        print("note: the span boundary head (SpanBERT's, 9 tensors) is left out: HF's BERT has no place for it")
    print(f"wrote {ns.to} checkpoint {out}{extra}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(argv)  # imports a verb's module: Ctrl-C may land here
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    ns, extra = parser.parse_known_args(argv)
    if extra and (getattr(ns, "config_verb", None) or ns.verb == "eval") and not any(a.startswith("-") for a in extra):
        ns.args += extra  # overrides after a flag: `pretrain cfg.yaml --overwrite max_steps=5`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(ns, "config_verb", None):
            return _run_config_verb(ns.config_verb, ns.args, ns.overwrite)
        if ns.verb == "convert":
            _convert(ns)
        elif ns.verb == "eval":
            from llmlab.eval import run as eval_run

            return eval_run.main(ns.args, ns.server, server_model=ns.server_model, as_json=ns.json,
                                 overwrite=ns.overwrite)
        elif ns.verb == "plan":
            from llmlab.plan import commands as plan_commands

            plan_commands.run_plan(ns)
        elif ns.verb in ("generate", "chat"):
            from llmlab.generate import commands

            (commands.run_generate if ns.verb == "generate" else commands.run_chat)(ns)
        elif ns.verb == "serve":
            from llmlab.serve import commands as serve_commands

            serve_commands.run_serve(ns)
        elif ns.verb == "studio":
            from llmlab.studio import commands as studio_commands

            studio_commands.run(ns)
    except LlmlabError as e:
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a file system refusal nothing above foresaw: name the file
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or e}")
        return 1
    except MemoryError:
        _error("out of memory")
        return 1
    except Exception as e:  # a bug: one line, and the traceback on request
        if os.environ.get("LLMLAB_TRACEBACK"):
            traceback.print_exc()
        _error(f"internal error ({type(e).__name__}: {e}); this is a bug in llmlab, please report it with the "
               "traceback that LLMLAB_TRACEBACK=1 prints")
        return 1
    return 0


def _error(message: str) -> None:
    print(style("error:", "31", sys.stderr), message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
