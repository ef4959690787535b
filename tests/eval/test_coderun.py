"""The code runner: a sample passes only by running its tests to the end; hostile snippets (loops,
memory bombs, forks, writes and deletes outside the folder, sockets, ctypes, floods of output, early
exits) each end as a failed sample with the right status, and leave the test process and its files
as they were. pass@k against hand-computed values; the filter and the fence extraction."""

from __future__ import annotations

import math
import os
import resource
import shutil
import socket
import subprocess
import time
from fractions import Fraction

import pytest

from llmlab.eval import coderun
from llmlab.eval.coderun import Limits, RunResult, extract_code, filter_by_tests, pass_at_k, run_code, run_many

QUICK = Limits(timeout=2.0, memory_mb=128)


def run(program: str, tests: str = "", limits: Limits = QUICK) -> RunResult:
    return run_code(program, tests, limits)


# --------------------------------------------------------------------------- the contract


def test_a_passing_and_a_failing_sample():
    program = "def add(a, b):\n    return a + b\n"
    good = run(program, "assert add(1, 2) == 3\nprint('ran')")
    assert good.status == "passed" and good.passed and good.detail == ""
    assert good.output == "ran\n"
    assert {"rlimits", "audit-hook"} <= set(good.layers)
    bad = run(program.replace("a + b", "a - b"), "print('before')\nassert add(1, 2) == 3")
    assert bad.status == "failed" and not bad.passed
    assert bad.output.startswith("before\n") and "AssertionError" in bad.output and "sample.py" in bad.output
    assert "coderun.py" not in bad.output  # the bootstrap's frames are not the sample's business


def test_humaneval_check_style_and_a_stable_hash_seed():
    result = run("def add(a, b):\n    return a + b",
                 "def check(candidate):\n    assert candidate(2, 2) == 4\ncheck(add)")
    assert result.passed
    hashes = [run("print(hash('llmlab'), list({'a', 'b', 'c', 'd'}))").output for _ in range(2)]
    assert hashes[0] == hashes[1] and hashes[0].strip()


@pytest.mark.parametrize("program, tests", [
    ("import sys\nsys.exit(0)", "assert False"),
    ("import os\nos._exit(0)", "assert False"),
    ("def f():\n    raise SystemExit(0)", "f()\nassert True"),
    # forging the verdict without the run's token: "passed" on every descriptor, then a clean exit
    (("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'passed\\n')\n    except OSError:\n"
      "        pass\nos._exit(0)"), ""),
])
def test_an_early_exit_is_never_a_pass(program, tests):
    result = run(program, tests)
    assert result.status == "failed" and not result.passed


def test_the_folder_is_removed_and_the_parent_is_untouched():
    before = (os.getcwd(), dict(os.environ), resource.getrlimit(resource.RLIMIT_AS),
              resource.getrlimit(resource.RLIMIT_CPU), resource.getrlimit(resource.RLIMIT_FSIZE))
    shown = run("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('x' * 100)\n"
                "print(os.environ['HOME'] == os.getcwd(), ' '.join(sorted(set(os.environ) - {'LC_CTYPE'})))")
    folder, env = shown.output.splitlines()
    assert shown.passed and folder.startswith("/") and not os.path.exists(folder)
    assert env == ("True HOME MKL_NUM_THREADS OMP_NUM_THREADS OPENBLAS_NUM_THREADS PATH PYTHONHASHSEED PYTHONUTF8 "
                   "TMPDIR")  # LC_CTYPE only where Python coerces a C locale
    timed = run("import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    pass", limits=Limits(timeout=0.5))
    assert timed.status == "timeout" and not os.path.exists(timed.output.split()[0])
    run("x = bytearray(1 << 40)")
    after = (os.getcwd(), dict(os.environ), resource.getrlimit(resource.RLIMIT_AS),
             resource.getrlimit(resource.RLIMIT_CPU), resource.getrlimit(resource.RLIMIT_FSIZE))
    assert after == before


# --------------------------------------------------------------------------- limits


def test_an_infinite_loop_times_out_near_its_wall_clock_limit():
    result = run("while True:\n    pass", limits=Limits(timeout=1.0))
    assert result.status == "timeout" and "wall-clock" in result.detail
    assert 1.0 <= result.seconds < 1.0 + coderun.DRAIN_SECONDS


def test_sleeping_past_the_limit_times_out():
    t0 = time.monotonic()
    result = run("import time\ntime.sleep(60)", limits=Limits(timeout=0.5))
    assert result.status == "timeout" and time.monotonic() - t0 < 2.0


def test_the_cpu_limit_stops_a_busy_loop_before_the_wall_clock_one():
    result = run("while True:\n    pass", limits=Limits(timeout=20.0, cpu_seconds=1))
    assert result.status == "timeout" and "CPU" in result.detail
    assert result.seconds < 5.0


@pytest.mark.parametrize("program", [
    "x = bytearray(1 << 40)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))",
    "x = 'a' * (1 << 34)",
])
def test_a_memory_bomb_is_a_memory_failure(program):
    result = run(program)
    assert result.status == "memory" and "MemoryError" in result.output


def test_a_flood_of_output_is_cut_and_does_not_change_the_verdict():
    limits = Limits(timeout=5.0, memory_mb=128, output_bytes=4096)
    result = run("print('head')\nprint('x' * 5_000_000)\nprint('tail')", "assert True", limits)
    assert result.passed
    assert len(result.output) < 4096 + 100 and "bytes cut" in result.output
    assert result.output.startswith("head\n") and result.output.endswith("tail\n")
    endless = run("while True:\n    print('y' * 1000)", limits=Limits(timeout=1.0, output_bytes=4096))
    assert endless.status == "timeout" and len(endless.output) < 4096 + 100


def test_a_file_bigger_than_the_limit_cannot_be_written():
    result = run("open('big', 'wb').write(b'x' * (3 << 20))", limits=Limits(timeout=2.0, file_mb=1))
    assert result.status == "failed" and "File too large" in result.output


# --------------------------------------------------------------------------- hostile snippets


@pytest.fixture
def outside(tmp_path):
    """A folder outside the sandbox with a file the code must not touch."""
    keep = tmp_path / "keep.txt"
    keep.write_text("keep")
    return tmp_path


WRITES = [  # (snippet, expected status): each tries to create TARGET outside its folder
    ("open(TARGET, 'w').write('pwned')", "error"),
    ("open(TARGET, 'a').write('pwned')", "error"),
    ("import pathlib\npathlib.Path(TARGET).write_text('pwned')", "error"),
    ("import os\nos.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))", "error"),
    ("import os\nopen(os.path.relpath(TARGET), 'w')", "error"),
    ("import shutil\nshutil.copy('sample.py', TARGET)", "error"),
    ("import os\nos.rename('sample.py', TARGET)", "error"),
    ("import os\nos.symlink(TARGET, 'link')\nopen('link', 'w')", "error"),
    ("import os\nos.mkdir(TARGET)", "error"),
    ("import sqlite3\nsqlite3.connect(TARGET).execute('create table t (x)')", "error"),
    (("import os\nfd = os.open(os.path.dirname(TARGET), os.O_RDONLY)\n"
      "os.close(os.open('pwned', os.O_WRONLY | os.O_CREAT, dir_fd=fd))"), "error"),
    ("import os\nos.mknod(TARGET)", "failed"),  # no audit event guards it, so it is gone
]


@pytest.mark.parametrize("snippet, status", WRITES)
def test_nothing_is_written_outside_the_folder(snippet, status, outside):
    target = outside / "pwned"
    result = run(f"TARGET = {str(target)!r}\n" + snippet)
    assert result.status == status, result.output
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


DELETES = [  # each tries to remove or change KEEP (outside.keep.txt) or its folder
    "import os\nos.remove(KEEP)",
    "import os\nos.unlink(KEEP)",
    "import pathlib\npathlib.Path(KEEP).unlink()",
    "import os, shutil\nshutil.rmtree(os.path.dirname(KEEP))",
    "import os\nos.rename(KEEP, 'here.txt')",
    "import os\nos.truncate(KEEP, 0)",
    "open(KEEP, 'w')",
    "import os\nos.chmod(KEEP, 0)",
]


@pytest.mark.parametrize("snippet", DELETES)
def test_nothing_outside_the_folder_is_deleted_or_changed(snippet, outside):
    keep = outside / "keep.txt"
    mode = keep.stat().st_mode
    result = run(f"KEEP = {str(keep)!r}\n" + snippet)
    assert result.status == "error" and "sandbox" in result.output
    assert keep.read_text() == "keep" and keep.stat().st_mode == mode


PROCESSES = [  # each tries to start a process that would create MARKER
    "import os\nos.system('touch ' + MARKER)",
    "import subprocess\nsubprocess.run([TOUCH, MARKER])",
    "import os\nos.execv(TOUCH, [TOUCH, MARKER])",
    "import os\nos.posix_spawn(TOUCH, [TOUCH, MARKER], {})",
    "import os\nif os.fork() == 0:\n    open(MARKER, 'w')",
    "import os\nwhile True:\n    os.fork()",  # the fork bomb
    "import multiprocessing as mp\np = mp.Process(target=open, args=(MARKER, 'w'))\np.start()\np.join()",
    "import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess",
    "import pty\npty.spawn([TOUCH, MARKER])",
]


@pytest.mark.parametrize("snippet", PROCESSES)
def test_no_process_is_started(snippet, tmp_path):
    marker = tmp_path / "marker"
    touch = shutil.which("touch") or "/usr/bin/touch"
    result = run(f"MARKER, TOUCH = {str(marker)!r}, {touch!r}\n" + snippet)
    assert result.status == "error" and "sandbox" in result.output
    assert not marker.exists()


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server
    server.close()


SOCKETS = [
    "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=1)",
    "import _socket\n_socket.socket().connect(('127.0.0.1', PORT))",
    "import urllib.request\nurllib.request.urlopen(f'http://127.0.0.1:{PORT}/', timeout=1)",
    "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', PORT))",
    "import socket\nsocket.socket(socket.AF_UNIX).connect('/run/anything.sock')",
]


@pytest.mark.parametrize("snippet", SOCKETS)
def test_no_socket_is_opened(snippet, listener):
    result = run(f"PORT = {listener.getsockname()[1]}\n" + snippet)
    assert result.status == "error" and "socket" in result.output
    listener.settimeout(0.2)
    with pytest.raises(socket.timeout):
        listener.accept()


@pytest.mark.parametrize("snippet", [
    "import ctypes\nctypes.CDLL(None).system(b'true')",
    "import sys\nsys.modules.pop('_ctypes', None)\nimport _ctypes",
])
def test_ctypes_does_not_load(snippet):
    result = run(snippet)
    assert result.status == "error" and "ctypes" in result.output


def test_numpy_still_imports_without_ctypes():
    pytest.importorskip("numpy")
    result = run("import numpy as np", "assert int(np.arange(4).sum()) == 6", Limits(timeout=5.0))
    assert result.passed, result.output


@pytest.mark.parametrize("snippet", [
    "import os, signal\nos.kill(VICTIM, signal.SIGKILL)",
    "import os, signal\nos.killpg(os.getpgid(VICTIM), signal.SIGKILL)",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    "import gc\ngc.get_objects()",
    "import os\nos.chdir('/')",
])
def test_the_sandbox_and_other_processes_are_out_of_reach(snippet):
    victim = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        result = run(f"VICTIM = {victim.pid}\n" + snippet)
        assert result.status == "error" and "sandbox" in result.output
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_the_code_cannot_add_an_audit_hook():
    # sys.addaudithook drops a hook that an existing one objects to, without an error
    result = run("import sys\nseen = []\nsys.addaudithook(lambda event, args: seen.append(event))\nopen('x', 'w')",
                 "assert seen == []")
    assert result.passed, result.output


def test_what_the_code_may_do_inside_its_folder():
    program = ("import os, shutil, tempfile, sqlite3, threading, collections\n"
               "os.makedirs('a/b')\nopen('a/b/f.txt', 'w').write('hi')\nos.rename('a/b/f.txt', 'a/g.txt')\n"
               "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
               "sqlite3.connect(':memory:').execute('select 1')\nshutil.rmtree('a')\n"
               "t = threading.Thread(target=print, args=('thread',))\nt.start()\nt.join()\n"
               "P = collections.namedtuple('P', 'x y')\nopen(os.devnull, 'w').write('quiet')\n"
               "try:\n    import socket\n    socket.socket()\nexcept PermissionError:\n    print('caught')\n")
    result = run(program, "assert not os.path.exists('a') and P(1, 2).y == 2")
    assert result.passed, result.output
    assert result.output == "thread\ncaught\n"  # a refusal the code handles is not a failure


# --------------------------------------------------------------------------- each kernel layer alone


def test_landlock_alone_stops_writes_outside(outside, monkeypatch):
    monkeypatch.setattr(coderun, "_LAYERS", ("landlock",))
    target = outside / "pwned"
    probe = run("")
    if "landlock" not in probe.layers:
        pytest.skip("this kernel has no Landlock")
    for snippet in (f"open({str(target)!r}, 'w')", f"import os\nos.mknod({str(target)!r})",
                    f"import os\nos.remove({str(outside / 'keep.txt')!r})"):
        result = run(snippet)
        assert result.status == "failed" and "Permission denied" in result.output
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert run("open('inside.txt', 'w').write('ok')").passed


def test_the_network_namespace_alone_stops_connections(listener, monkeypatch):
    monkeypatch.setattr(coderun, "_LAYERS", ("netns",))
    port = listener.getsockname()[1]
    result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
    if "netns" not in result.layers:
        pytest.skip("this kernel does not allow an unprivileged network namespace")
    assert result.status == "failed" and "unreachable" in result.output
    listener.settimeout(0.2)
    with pytest.raises(socket.timeout):
        listener.accept()


# --------------------------------------------------------------------------- many, filter, fences


def test_run_many_keeps_the_given_order():
    samples = [(f"import time\ntime.sleep({0.3 - 0.1 * (i % 3)})\nprint({i})", "assert True" if i % 2 else "assert 0")
               for i in range(6)]
    results = run_many(samples, QUICK, workers=3)
    assert [r.output.split()[0] for r in results] == [str(i) for i in range(6)]
    assert [r.status for r in results] == ["failed", "passed"] * 3
    assert run_many([], QUICK) == []
    with pytest.raises(ValueError, match="workers"):
        run_many(samples, QUICK, workers=0)


def test_filter_by_tests_keeps_records_whose_code_passes():
    records = [
        {"id": 0, "output": "Sure:\n```python\ndef sq(x):\n    return x * x\n```\nDone.", "tests": "assert sq(3) == 9"},
        {"id": 1, "output": "def sq(x):\n    return x + x", "tests": "assert sq(3) == 9"},
        {"id": 2, "output": "```python\nimport os\nos.system('true')\n```", "tests": "assert True"},
        {"id": 3, "output": "```py\nwhile True:\n    pass\n```", "tests": "assert True"},
        {"id": 4, "output": "def sq(x):\n    return x ** 2", "tests": "assert sq(4) == 16"},
    ]
    kept, dropped = filter_by_tests(iter(records), limits=Limits(timeout=1.0, memory_mb=128))
    assert [r["id"] for r in kept] == [0, 4] and [r["id"] for r in dropped] == [1, 2, 3]
    assert kept[0] is records[0]
    code_kept, _ = filter_by_tests([{"code": "x = 1", "check": "assert x == 1"}], "code", "check", QUICK)
    assert len(code_kept) == 1


@pytest.mark.parametrize("records, message", [
    ([{"output": "x = 1", "tests": ""}, {"output": "x = 1"}], "record 1 has no field 'tests'"),
    ([{"tests": ""}], "record 0 has no field 'output'"),
    ([{"output": ["x = 1"], "tests": ""}], "record 0 field 'output' is list"),
])
def test_filter_by_tests_names_a_bad_record(records, message):
    with pytest.raises(ValueError, match=message):
        filter_by_tests(records)


@pytest.mark.parametrize("text, code", [
    ("def f():\n    return 1\n", "def f():\n    return 1\n"),
    ("Here:\n```python\ndef f():\n    return 1\n```\nThat's it.", "def f():\n    return 1\n"),
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```Python3\nx = 1\n```", "x = 1\n"),
    ("```\nx = 1\n```", "x = 1\n"),
    ("Run:\n```bash\nls\n```\nthen\n```python\nx = 1\n```", "x = 1\n"),
    ("```python\nx = 1\n```\n```python\ny = 2\n```", "x = 1\n"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # cut at the token limit
    ("1. Code:\n   ```python\n   x = 1\n   ```", "x = 1\n"),
])
def test_extract_code(text, code):
    assert extract_code(text) == code


# --------------------------------------------------------------------------- pass@k and limits


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
    (10, 3, 2, 24 / 45),  # 1 - C(7,2)/C(10,2) = 1 - 21/45
    (5, 2, 5, 1.0),  # k = n: any passing sample is drawn
    (5, 0, 5, 0.0),
    (5, 0, 1, 0.0),  # c = 0
    (5, 5, 1, 1.0),  # c = n
    (5, 5, 3, 1.0),
    (4, 1, 3, 0.75),  # 1 - C(3,3)/C(4,3) = 1 - 1/4
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_where_the_binomials_are_huge():
    n, c, k = 2000, 37, 100
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 2, 6), (5, 6, 1), (-1, 0, 1), (5, -1, 1), (5, 2, 0), (5, 2, -1), (5.0, 2, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@pytest.mark.parametrize("kwargs, field", [
    ({"timeout": 0}, "timeout"), ({"timeout": float("inf")}, "timeout"), ({"cpu_seconds": 0}, "cpu_seconds"),
    ({"memory_mb": 16}, "memory_mb"), ({"output_bytes": 10}, "output_bytes"), ({"file_mb": 0}, "file_mb"),
])
def test_limits_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"Limits.{field}"):
        Limits(**kwargs)
    assert Limits(timeout=2.5).cpu == 3 and Limits(cpu_seconds=7).cpu == 7


def test_a_bad_argument_is_the_callers_error():
    with pytest.raises(TypeError):
        run_code(b"x = 1", "")  # type: ignore[arg-type]
