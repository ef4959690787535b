"""lm-evaluation-harness drives an llmlab checkpoint (`--model llmlab`): in process, every request kind
gets what LocalLM answers when called directly; the installed .pth hook registers "llmlab" lazily
(nothing of llmlab or torch imported, the built-in models kept) and silently; the unmodified `lm_eval`
command and `python -m llmlab.eval.lm_eval_model` run a local task on the checkpoint; both the wheel and
the editable wheel carry the .pth file."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab.eval.lm import EvalError, LocalLM
from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import save_model
from llmlab.tokenizer import train_bpe

lm_eval = pytest.importorskip("lm_eval")

WORDS = "red blue green cat dog bird fish tree sun moon star book door hand road ship rain snow".split()
TASKS = ["mc", "ppl", "gen"]

MC = """task: mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""

PPL = """task: ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""

GEN = """task: gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random llmlab checkpoint (context 32, so some documents span several windows) and the
    three task YAMLs over JSONL files."""
    root = tmp_path_factory.mktemp("lm_eval_model")
    rng = random.Random(0)
    tok = train_bpe([" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(150)], vocab_size=300)
    torch.manual_seed(0)
    ckpt = root / "ckpt"
    save_model(build_model(LlamaConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=32)),
               ckpt)
    tok.save(ckpt)
    data, tasks = root / "data", root / "tasks"
    data.mkdir()
    tasks.mkdir()
    rows = {
        "mc": [{"question": " ".join(rng.sample(WORDS, 4)), "choices": rng.sample(WORDS, 3), "label": rng.randrange(3)}
               for _ in range(12)],
        "ppl": [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))} for _ in range(4)],
        "gen": [{"question": " ".join(rng.sample(WORDS, 3)), "answer": rng.choice(WORDS)} for _ in range(4)],
    }
    for name, text in zip(TASKS, (MC, PPL, GEN)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        (tasks / f"{name}.yaml").write_text(text.format(data=data))
    return ckpt, tasks, root


def _offline_env(root: Path) -> dict[str, str]:
    return {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf-cache"),
            "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def harness(setup):
    """simple_evaluate with model="llmlab", registered by importing the module (the Python route)."""
    ckpt, tasks, root = setup
    from lm_eval.tasks import TaskManager

    import llmlab.eval.lm_eval_model  # noqa: F401

    with pytest.MonkeyPatch.context() as mp:
        for key, value in _offline_env(root).items():
            mp.setenv(key, value)
        return lm_eval.simple_evaluate(model="llmlab", model_args=f"path={ckpt},device=cpu", batch_size=4, tasks=TASKS,
                                       task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                                       bootstrap_iters=0)


def _samples(harness, task):
    return sorted(harness["samples"][task], key=lambda s: s["doc_id"])


def test_every_request_gets_what_local_lm_answers(setup, harness):
    ckpt, _, _ = setup
    lm = LocalLM.from_path(ckpt, device="cpu")
    mc = _samples(harness, "mc")
    assert len(mc) == 12
    for s in mc:
        pairs = [tuple(a) for a in s["arguments"]]
        assert len(pairs) == 3 and pairs[0][0].startswith("Question: ")
        assert [r[0][0] for r in s["resps"]] == pytest.approx([ll for ll, _ in lm.loglikelihood(pairs)], abs=1e-5)
    acc = harness["results"]["mc"]["acc,none"]
    assert math.isfinite(acc) and 0 <= acc <= 1

    ppl = _samples(harness, "ppl")
    assert len(ppl) == 4 and max(len(lm.encode(s["arguments"][0][0])) for s in ppl) > 32  # rolling windows
    for s in ppl:
        assert s["resps"][0][0] == pytest.approx(lm.loglikelihood_rolling([s["arguments"][0][0]])[0], abs=1e-4)
    assert math.isfinite(harness["results"]["ppl"]["word_perplexity,none"])

    gen = _samples(harness, "gen")
    assert len(gen) == 4
    for s in gen:
        context, kwargs = s["arguments"][0]
        assert s["resps"][0][0] == lm.generate_until([(context, kwargs)])[0]

    assert harness["config"]["model_hash"] == lm.hash


def test_model_args_win_over_lm_eval_options_and_batch_sizes_follow_its_conventions(setup, caplog):
    from llmlab.common import choose_device
    from llmlab.eval.lm_eval_model import LlmlabLM, batch_rows, here

    ckpt, _, _ = setup
    # lm-eval's CLI always passes --batch_size and --device (default "cuda:0")
    model = LlmlabLM.create_from_arg_string(f"path={ckpt},device=cpu,batch_size=3",
                                            {"batch_size": "1", "max_batch_size": None, "device": "cuda:0"})
    assert (model.lm.batch_size, str(model.device)) == (3, "cpu")
    assert LlmlabLM.create_from_arg_obj({"path": str(ckpt), "device": "cpu"}, {"batch_size": "5"}).lm.batch_size == 5
    assert here("cuda:99") == str(choose_device("auto")) and "cuda:99" in caplog.text  # as lm-eval's hf falls back
    assert batch_rows(8) == 8 and batch_rows("16") == 16
    assert batch_rows("auto") == 32 and batch_rows("auto:4", 64) == 64
    for bad in (0, "x", None):
        with pytest.raises(EvalError, match="batch_size"):
            batch_rows(bad)


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_installed_hook_registers_lazily_and_keeps_the_builtin_models():
    probe = _python("""
import sys
started = sorted(m for m in ("llmlab_lm_eval_hook", "llmlab", "torch") if m in sys.modules)
import lm_eval.models
from lm_eval.api.registry import model_registry
print(started, model_registry._objs.get("llmlab"), "hf" in model_registry, "llmlab" in sys.modules)
""")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split("\n")[0] == "['llmlab_lm_eval_hook'] llmlab.eval.lm_eval_model:LlmlabLM True False", (
        "the llmlab_lm_eval.pth hook is not active in this environment: reinstall llmlab (make install)")


def test_hook_is_silent_and_survives_an_lm_eval_without_a_registry(tmp_path):
    # a package named lm_eval whose models module imports but has no lm_eval.api.registry to register into
    (tmp_path / "lm_eval" / "models").mkdir(parents=True)
    (tmp_path / "lm_eval" / "__init__.py").write_text("")
    (tmp_path / "lm_eval" / "models" / "__init__.py").write_text("MODEL_MAPPING = {}\n")
    probe = _python("import lm_eval.models; print(lm_eval.models.MODEL_MAPPING)", {"PYTHONPATH": str(tmp_path)})
    assert (probe.returncode, probe.stdout, probe.stderr) == (0, "{}\n", "")
    quiet = _python("pass")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["lm_eval", "python -m llmlab.eval.lm_eval_model"])
def test_command_line_scores_the_checkpoint(setup, harness, tmp_path, command):
    ckpt, tasks, root = setup
    if command == "lm_eval":
        argv = [str(Path(sys.executable).parent / "lm_eval")]
        if not Path(argv[0]).exists():
            pytest.skip("lm-eval's console script is not installed beside this Python")
    else:
        argv = [sys.executable, "-m", "llmlab.eval.lm_eval_model"]
    done = subprocess.run([*argv, "--model", "llmlab", "--model_args", f"path={ckpt},device=cpu", "--tasks", "mc",
                           "--include_path", str(tasks), "--batch_size", "4", "--output_path", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **_offline_env(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    [results] = tmp_path.rglob("results_*.json")
    acc = json.loads(results.read_text())["results"]["mc"]["acc,none"]
    assert acc == pytest.approx(harness["results"]["mc"]["acc,none"], abs=1e-12)


@pytest.mark.slow
def test_wheel_and_editable_wheel_carry_the_pth_file(tmp_path):
    """setup.py writes the .pth where each build packs it; the editable one relies on setuptools internals."""
    import shutil
    import zipfile

    pytest.importorskip("setuptools")
    repo = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"
    shutil.copytree(repo / "llmlab", src / "llmlab", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md", "llmlab_lm_eval_hook.py"):
        shutil.copy(repo / name, src / name)
    build = "from setuptools import build_meta as b; b.build_wheel('out'); b.build_editable('out')"
    done = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wheels = {}
    for path in (src / "out").glob("*.whl"):
        with zipfile.ZipFile(path) as z:
            wheels[path.name.split("-")[2]] = z.namelist()
    assert set(wheels) == {"py3", "0.editable"}
    for names in wheels.values():
        assert "llmlab_lm_eval.pth" in names
    assert "llmlab_lm_eval_hook.py" in wheels["py3"]
    with zipfile.ZipFile(next((src / "out").glob("*editable*.whl"))) as z:
        assert "llmlab_lm_eval_hook" in z.read(next(n for n in z.namelist() if n.endswith("_finder.py"))).decode()
        assert z.read("llmlab_lm_eval.pth").decode().startswith("import sys; exec('try:\\n import llmlab_lm_eval_hook")
