"""Model-written Python runs here with its unit tests: in a child process, in a temporary folder of
its own, under limits, and the answer is a pass or a fail per sample, never an exception in the
caller. Code tasks' pass@k (`llmlab eval`) and the Code Llama-style filter of instruction data
(keep a record only if its code passes its tests) both go through `run_code`.

Contract. `run_code(program, tests)` writes `program + "\\n" + tests` to `sample.py` in a fresh
temporary folder and runs it with this interpreter, the folder as working directory, HOME and TMPDIR,
stdin /dev/null, and an environment of a few fixed variables. The tests are plain Python run after the program
(`assert add(1, 2) == 3`); HumanEval's `def check(candidate)` style works when the caller appends
the call (`check(add)`). The sample passes iff the program and its tests run to their end and the
process exits 0 within the limits: an exception (a failed assert), `sys.exit` of any code (so a
unittest suite ends with `assert unittest.main(exit=False).result.wasSuccessful()`), `os._exit`, a
crash, a timeout, running out of memory or an action the sandbox refuses are each a failed sample,
and `RunResult.status` says which. The verdict comes from the child's bootstrap, on a pipe of its
own, marked with a random token per run: exiting 0 early, or writing "passed" to every descriptor,
does not pass. The folder is always removed.

Threat model. The code is untrusted but not expected to attack the machine: a model that loops,
allocates without end, deletes files, forks, opens sockets or prints megabytes, by mistake or because
its training data did. Against that the child layers, in this order (the names are those
`RunResult.layers` lists when a layer took effect):

1. "rlimits": resource limits: address space (`memory_mb`), CPU seconds, the largest file, no core dumps; its
   own session and process group, which the parent kills whole at the wall-clock limit or when the
   child ends.
2. "netns", where the kernel allows unprivileged namespaces: a new user and network namespace, so no
   network at all (only a loopback that is down), and no capability over anything outside.
3. "landlock" (Linux >= 5.13, where enabled): the kernel refuses every write, create, remove or rename
   outside the folder (and /dev/null), whatever route the code takes to the syscall; with Landlock
   ABI >= 4 every TCP bind and connect; with ABI >= 6 signals to processes outside the sandbox and
   abstract unix sockets.
4. "audit-hook" (PEP 578), installed before the code runs, raises PermissionError for: any socket,
   writing or changing any path that does not resolve inside the folder (or to /dev/null), symlinks
   and hard links, opening a directory outside (a descriptor to one could anchor writes through
   dir_fd), new processes (`subprocess`, `os.system`, `os.exec*`, `os.posix_spawn`, `os.fork`,
   `pty.spawn`), signals to other processes, changing resource limits, and the `gc` calls that
   could reach the hook; `import ctypes` is an ImportError (its function pointers call C with no
   audit event; numpy and others do without it); `sys.addaudithook` silently adds nothing (CPython
   drops a hook that an existing one objects to). `os.mknod`, `os.mkfifo`, `os.pidfd_open` and
   `_posixsubprocess.fork_exec`, which raise no audit event, are removed before the code runs, and
   importing a fresh copy of their modules is refused.
5. always: a scrubbed environment, and `-B -s -P`: isolated mode but for `-E`, so that
   PYTHONHASHSEED=0 makes hashing, and so set order, the same on every run.

Where the kernel refuses namespaces or lacks Landlock, the other layers still hold; with all of them
off but the hook, the hook alone stops every hostile snippet in the tests, and with the kernel layers
alone, all but a chmod of a file outside.

What this is not: a security boundary against a determined attacker. The audit hook is Python-level:
code that means to can fool it (a PathLike whose `__fspath__` answers differently the second time,
patching `posixpath` internals its path check calls, sqlite's ATTACH, a C extension doing its own
I/O), and can forge a verdict by walking frames to the bootstrap's token. Layers 1-3 hold against
that, where the kernel has them; none of it holds against kernel exploits. Reading is not confined:
the code can read any file the parent's user can. For hostile input use a VM or gVisor.

This file runs as a script in the child (`_child`, standard library only); the rest is the parent's.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

STATUSES = ("passed", "failed", "timeout", "memory", "error")
DRAIN_SECONDS = 2.0  # how long the parent reads what is left in the pipes after the child ends or is killed
CHILD_PATH = "/usr/bin:/bin"
_LAYERS = ("netns", "landlock", "audit-hook")  # the optional layers the child sets up (tests try each alone)


@dataclass(frozen=True)
class Limits:
    """What one sample may use. The child's interpreter (about 15 MB) counts against `memory_mb`."""

    timeout: float = 5.0  # wall-clock seconds for the whole run, interpreter start-up included
    cpu_seconds: int | None = None  # CPU seconds (RLIMIT_CPU); None: the timeout rounded up
    memory_mb: int = 512  # address space of the child (RLIMIT_AS)
    output_bytes: int = 8192  # stdout and stderr kept: the head and the tail, the middle cut
    file_mb: int = 16  # the largest file the code may write in its folder (RLIMIT_FSIZE)

    def __post_init__(self):
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"Limits.timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.cpu_seconds is not None and not (isinstance(self.cpu_seconds, int) and self.cpu_seconds >= 1):
            raise ValueError(f"Limits.cpu_seconds must be None or a whole number >= 1, got {self.cpu_seconds!r}")
        if not (isinstance(self.memory_mb, int) and self.memory_mb >= 32):
            raise ValueError(f"Limits.memory_mb must be a whole number >= 32 (the interpreter needs about 15), "
                             f"got {self.memory_mb!r}")
        if not (isinstance(self.output_bytes, int) and self.output_bytes >= 256):
            raise ValueError(f"Limits.output_bytes must be a whole number >= 256, got {self.output_bytes!r}")
        if not (isinstance(self.file_mb, int) and self.file_mb >= 1):
            raise ValueError(f"Limits.file_mb must be a whole number >= 1, got {self.file_mb!r}")

    @property
    def cpu(self) -> int:
        return self.cpu_seconds if self.cpu_seconds is not None else math.ceil(self.timeout)


@dataclass
class RunResult:
    """One sample's outcome. Only "passed" passes; the others name why not."""

    status: str  # "passed" | "failed" | "timeout" | "memory" | "error"
    output: str  # the child's stdout and stderr together, cut in the middle past Limits.output_bytes
    seconds: float  # wall-clock time from start to end of the child
    detail: str = ""  # why it did not pass, in words
    layers: tuple[str, ...] = ()  # the isolation layers that took effect in the child (see the module)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------- pure helpers

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = ("python", "python3", "py", "py3")


def extract_code(text: str) -> str:
    """The code in a model's answer: the first ```python fenced block (```py and ```python3 too),
    else the first fenced block of any or no language, else the whole text. An opening fence with no
    closing one (an answer cut at its token limit) runs to the end; an indented block is dedented."""
    blocks = _FENCE.findall(text)
    if not blocks:
        return text
    body = next((b for tag, b in blocks if tag.lower() in _PYTHON_TAGS), blocks[0][1])
    return textwrap.dedent(body)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. 2021, "Evaluating Large Language Models Trained
    on Code", eq. 1: for a problem with n samples of which c pass,

        pass@k = 1 - C(n - c, k) / C(n, k)

    the chance that k samples drawn without replacement include a passing one. Computed as the
    product 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the large binomials.

    Raises:
        ValueError: a negative or non-integer argument, k < 1, k > n or c > n.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"pass_at_k: {name} must be a non-negative integer, got {value!r}")
    if k < 1 or k > n:
        raise ValueError(f"pass_at_k: k must be between 1 and n={n}, got {k}")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} passing samples is more than n={n} samples")
    if n - c < k:  # every draw of k holds a passing sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# --------------------------------------------------------------------------- the parent


def run_code(program: str, tests: str, limits: Limits = Limits()) -> RunResult:
    """Run `program` then `tests` in a sandboxed child (see the module) and say whether they passed.

    Whatever the code does, the answer is a RunResult; only a failure to start a process at all
    (no temp folder, no interpreter) raises, since that is the machine's fault, not the sample's.
    """
    if not isinstance(program, str) or not isinstance(tests, str):
        raise TypeError("run_code takes the program and its tests as strings")
    start = time.monotonic()
    folder = os.path.realpath(tempfile.mkdtemp(prefix="llmlab-code-"))
    verdict_r = verdict_w = -1
    process = None
    try:
        path = os.path.join(folder, "sample.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program + "\n" + tests)
        token = secrets.token_hex(16)
        verdict_r, verdict_w = os.pipe()
        config = {"folder": folder, "file": path, "token": token, "verdict_fd": verdict_w, "cpu": limits.cpu,
                  "memory": limits.memory_mb << 20, "file_size": limits.file_mb << 20, "layers": list(_LAYERS)}
        env = {"PATH": CHILD_PATH, "HOME": folder, "TMPDIR": folder, "PYTHONHASHSEED": "0", "PYTHONUTF8": "1",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        process = subprocess.Popen([sys.executable, "-B", "-s", "-P", os.path.abspath(__file__)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   cwd=folder, env=env, pass_fds=(verdict_w,), close_fds=True,
                                   start_new_session=True)
        os.close(verdict_w)
        verdict_w = -1
        try:
            process.stdin.write(json.dumps(config).encode())
        except OSError:  # the child died before it read its config: its exit status tells why
            pass
        finally:
            try:
                process.stdin.close()
            except OSError:
                pass
        output, verdict, timed_out, cpu = _wait(process, verdict_r, start + limits.timeout, limits.output_bytes)
        return _result(process.returncode, output, verdict, token, timed_out, cpu, limits,
                       time.monotonic() - start)
    finally:
        if process is not None and process.returncode is None:  # interrupted here (Ctrl-C): the child goes too
            _kill(process.pid)
            process.wait()
        for fd in (verdict_r, verdict_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)


def run_many(samples: Sequence[tuple[str, str]], limits: Limits = Limits(), workers: int = 2) -> list[RunResult]:
    """`run_code` over (program, tests) pairs, `workers` children at a time; results in the given order."""
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"run_many: workers must be a whole number >= 1, got {workers!r}")
    samples = list(samples)
    if not samples:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(samples))) as pool:
        return list(pool.map(lambda s: run_code(s[0], s[1], limits), samples))


def filter_by_tests(records: Iterable[dict], code_field: str = "output", tests_field: str = "tests",
                    limits: Limits = Limits(), workers: int = 2) -> tuple[list[dict], list[dict]]:
    """Split records into (kept, dropped): kept are those whose code (`extract_code` of
    `record[code_field]`) passes `record[tests_field]`; both lists keep the input order and the
    records themselves, unchanged.

    Raises:
        ValueError: a record lacks either field or holds something other than text in it (the message
            names the record's index and the field) -- before anything runs.
    """
    records = list(records)
    samples = []
    for i, record in enumerate(records):
        for name in (code_field, tests_field):
            if not isinstance(record, dict) or name not in record:
                raise ValueError(f"filter_by_tests: record {i} has no field {name!r}")
            if not isinstance(record[name], str):
                raise ValueError(f"filter_by_tests: record {i} field {name!r} is {type(record[name]).__name__}, "
                                 f"not text")
        samples.append((extract_code(record[code_field]), record[tests_field]))
    results = run_many(samples, limits, workers)
    kept = [r for r, res in zip(records, results) if res.passed]
    dropped = [r for r, res in zip(records, results) if not res.passed]
    return kept, dropped


class _Capped:
    """Bytes written to it, but only the first and last `cap // 2`, with a note of what was cut."""

    def __init__(self, cap: int):
        self.half, self.head, self.tail, self.cut = cap // 2, bytearray(), bytearray(), 0

    def write(self, data: bytes) -> None:
        room = self.half - len(self.head)
        self.head += data[:room]
        self.tail += data[max(room, 0):]
        if len(self.tail) > self.half:
            self.cut += len(self.tail) - self.half
            del self.tail[:len(self.tail) - self.half]

    def text(self) -> str:
        note = f"\n[... {self.cut} bytes cut ...]\n".encode() if self.cut else b""
        return (bytes(self.head) + note + bytes(self.tail)).decode("utf-8", errors="replace")


def _wait(process: subprocess.Popen, verdict_fd: int, deadline: float, cap: int):
    """Read the child's output and verdict until it ends or the deadline passes, kill its process
    group (whatever it left behind dies with it), reap it. Returns (output, verdict bytes, timed out,
    CPU seconds used)."""
    output, verdict = _Capped(cap), bytearray()
    sinks = {process.stdout.fileno(): output.write, verdict_fd: verdict.extend}
    timed_out = False
    while True:
        if _ended(process.pid):
            break
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        if sinks:
            _pump(sinks, min(left, 0.05))
        else:  # both pipes closed: only the exit is left to see
            time.sleep(min(left, 0.005))
    _kill(process.pid)  # not reaped yet, so its group id cannot have been reused
    end = time.monotonic() + DRAIN_SECONDS
    while sinks and time.monotonic() < end:
        _pump(sinks, end - time.monotonic())
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()
    del verdict[:-4096]  # the bootstrap's line is last; anything before it was written by the code
    return output.text(), bytes(verdict), timed_out, usage.ru_utime + usage.ru_stime


def _pump(sinks: dict, seconds: float) -> None:
    """Wait up to `seconds` for the pipes in `sinks` and hand what came to each one's sink; a pipe at
    its end leaves `sinks`."""
    poller = select.poll()
    for fd in sinks:
        poller.register(fd, select.POLLIN)
    for fd, _ in poller.poll(max(0.0, seconds) * 1000):
        data = os.read(fd, 1 << 16)
        if data:
            sinks[fd](data)
        else:
            del sinks[fd]


def _kill(pid: int) -> None:
    """Kill the child's whole process group: the child and anything it left behind."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _ended(pid: int) -> bool:
    """Whether the child has exited, without reaping it."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _result(code: int, output: str, verdict: bytes, token: str, timed_out: bool, cpu: float, limits: Limits,
            seconds: float) -> RunResult:
    word, layers = None, ()
    for line in verdict.decode("ascii", errors="replace").splitlines():
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == token and parts[1] in STATUSES:
            word, layers = parts[1], tuple(p for p in parts[2].split(",") if p)
    if timed_out:
        status, detail = "timeout", f"ran past its wall-clock limit of {limits.timeout:g} s"
    elif code < 0 and (-code == signal.SIGXCPU or (-code == signal.SIGKILL and cpu >= limits.cpu)):
        status, detail = "timeout", f"ran past its CPU limit of {limits.cpu} s"
    elif code < 0:
        status, detail = "error", f"crashed: killed by signal {_signal_name(-code)}"
    elif word == "passed" and code == 0:
        status, detail = "passed", ""
    elif word is not None and word != "passed":
        status, detail = word, _WORDS[word]
    else:
        status, detail = "failed", f"exited with code {code} before its tests finished"
    return RunResult(status, output, seconds, detail, layers)


_WORDS = {"failed": "the program or its tests raised, or exited before the tests finished",
          "memory": "ran out of memory (a MemoryError under its address-space limit)",
          "error": "the sandbox refused an action it took, or could not be set up"}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# --------------------------------------------------------------------------- the child
# Everything below runs in the child, before the sample, and imports only the standard library.

_REFUSED = frozenset({
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty", "pty.spawn",
    "os.symlink", "os.link",  # a link in the folder could point a later write outside it
    "sys.addaudithook", "resource.setrlimit", "resource.prlimit",  # the sandbox's own settings
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",  # the ways from Python to the hook's objects
})
_REFUSED_FAMILIES = ("socket", "ctypes")  # every event named "socket.*" or "ctypes.*"
# ctypes calls C through function pointers that raise no audit event (`ctypes.memmove`), so it may not
# load at all: an ImportError, which numpy and others catch; a fresh posix or _posixsubprocess would
# undo the removals
_REFUSED_IMPORTS = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "posix"})
_REMOVED = (("posix", "mknod"), ("posix", "mkfifo"), ("posix", "pidfd_open"), ("os", "mknod"), ("os", "mkfifo"),
            ("os", "pidfd_open"), ("_posixsubprocess", "fork_exec"))  # no audit event guards them
# event -> (index of a path argument, index of its dir_fd argument or None), for each path it changes
_PATHS = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
          "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
          "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "os.chdir": ((0, None),),
          "shutil.rmtree": ((0, 1),), "sqlite3.connect": ((0, None),)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _child() -> None:
    import builtins
    import types

    config = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    token, verdict_fd, folder, path = config["token"], config["verdict_fd"], config["folder"], config["file"]

    def report(word: str, layers: list[str]) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        try:
            os.write(verdict_fd, f"{token} {word} {','.join(layers)}\n".encode())
        finally:  # no atexit handlers, no waiting on the code's threads
            os._exit(0 if word == "passed" else 1)

    refused: list[str] = []
    try:
        layers = _confine(config, refused)
    except BaseException as e:
        _print_exc(e)
        print("coderun: the sandbox could not be set up", file=sys.stderr)
        report("error", [])
    module = types.ModuleType("__main__")  # a fresh __main__, so classes the code defines pickle
    module.__dict__.update(__file__=path, __builtins__=builtins)
    sys.modules["__main__"], sys.argv, sys.path[:0] = module, [path], [folder]
    word = "passed"
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
        exec(code, module.__dict__)
    except MemoryError as e:
        word = "memory"
        _print_exc(e)
    except SystemExit as e:
        word = "failed"
        print(f"coderun: the code called sys.exit({e.code!r}) before its tests finished", file=sys.stderr)
    except BaseException as e:
        word = "error" if _refusal(e, refused) else "failed"
        _print_exc(e)
    report(word, layers)


def _refusal(e: BaseException | None, refused: list) -> bool:
    """Whether the sandbox's refusal is `e` or what caused it (a refusal the code caught and moved past
    is not)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (PermissionError, ImportError)) and str(e) in refused:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _print_exc(e: BaseException) -> None:
    """The traceback as the code would see it run alone: without this file's frames."""
    import traceback

    try:
        sys.stdout.flush()  # what the code printed comes before its traceback
        summary = traceback.TracebackException.from_exception(e)
        summary.stack = traceback.StackSummary.from_list([f for f in summary.stack if f.filename != __file__])
        print("".join(summary.format()), end="", file=sys.stderr)
    except BaseException:  # out of memory again, or a stderr the code closed
        pass


def _limit(name: str, value: int, hard: int | None = None) -> None:
    import resource

    which = getattr(resource, name)
    current = resource.getrlimit(which)[1]
    hard = value if hard is None else hard
    if current != resource.RLIM_INFINITY:
        value, hard = min(value, current), min(hard, current)
    resource.setrlimit(which, (value, hard))


def _confine(config: dict, refused: list) -> list[str]:
    """Layers 1-4 of the module docstring, those of them `config["layers"]` names (rlimits always).
    Returns the names of those that took effect."""
    layers = []
    _limit("RLIMIT_CORE", 0)
    _limit("RLIMIT_CPU", config["cpu"], config["cpu"] + 1)  # SIGXCPU at the soft limit, SIGKILL a second later
    _limit("RLIMIT_FSIZE", config["file_size"])
    layers.append("rlimits")
    if sys.platform.startswith("linux"):
        if "netns" in config["layers"] and _unshare():
            layers.append("netns")
        if "landlock" in config["layers"] and _landlock(config["folder"]):
            layers.append("landlock")
    _limit("RLIMIT_AS", config["memory"])  # late, as the set-up needs memory; before the hook, which refuses it
    if "audit-hook" not in config["layers"]:
        return layers
    for name in [m for m in sys.modules if m in ("ctypes", "_ctypes") or m.startswith("ctypes.")]:
        del sys.modules[name]  # the set-up's ctypes: the code's own `import ctypes` meets the hook
    import _posixsubprocess  # noqa: F401 -- imported here, so the code's import finds this copy, neutered

    for module, name in _REMOVED:
        if hasattr(sys.modules[module], name):
            delattr(sys.modules[module], name)
    sys.addaudithook(_hook(config["folder"], refused))
    layers.append("audit-hook")
    return layers


def _unshare() -> bool:
    """A new user and network namespace for this process; False where the kernel says no."""
    flags = 0x10000000 | 0x40000000  # CLONE_NEWUSER | CLONE_NEWNET
    try:
        if hasattr(os, "unshare"):  # Python 3.12+
            os.unshare(flags)
            return True
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(flags) == 0
    except (OSError, AttributeError):
        return False


def _landlock(folder: str) -> bool:
    """Restrict this process and its descendants, by Landlock, to writing only beneath `folder` (and
    /dev/null), with no TCP (ABI >= 4) and no signals or abstract sockets outside (ABI >= 6).
    False where the kernel has no Landlock. See https://docs.kernel.org/userspace-api/landlock.html."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, AttributeError):
        return False
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    create, add_rule, restrict = 444, 445, 446  # the same numbers on every architecture
    abi = syscall(create, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return False
    write_file, truncate = 1 << 1, 1 << 14
    fs = write_file | sum(1 << b for b in range(4, 13))  # REMOVE_DIR ... MAKE_SYM: every way to change a tree
    fs |= (1 << 13 if abi >= 2 else 0) | (truncate if abi >= 3 else 0)  # REFER, TRUNCATE
    net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, allowed nowhere
    scoped = 0b11 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL

    class Ruleset(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    size = 8 if abi < 4 else 16 if abi < 6 else 24  # the struct grew with the ABI; the kernel reads what we say
    ruleset = syscall(create, ctypes.byref(Ruleset(fs, net, scoped)), size, 0)
    if ruleset < 0:
        return False
    try:
        for target, allowed in ((folder, fs), (os.devnull, write_file | (truncate if abi >= 3 else 0))):
            fd = os.open(target, os.O_PATH | os.O_CLOEXEC)
            try:
                if syscall(add_rule, ruleset, 1, ctypes.byref(PathBeneath(allowed, fd)), 0) != 0:  # PATH_BENEATH
                    return False
            finally:
                os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, which restrict_self requires
            return False
        return syscall(restrict, ruleset, 0) == 0
    finally:
        os.close(ruleset)


def _hook(folder: str, refused: list):
    """The audit hook of layer 4. Event names and arguments:
    https://docs.python.org/3/library/audit_events.html. Everything it calls is bound here, so
    patching `os`, `builtins` or this module's tables later does not change it."""
    import builtins

    realpath, fsdecode, fspath, isdir = os.path.realpath, os.fsdecode, os.fspath, os.path.isdir
    isinstance, any, bool = builtins.isinstance, builtins.any, builtins.bool
    paths, refused_events, families, imports = dict(_PATHS), _REFUSED, _REFUSED_FAMILIES, _REFUSED_IMPORTS
    pid, pgid, prefix, write_flags, devnull = os.getpid(), os.getpgrp(), folder + "/", _WRITE_FLAGS, os.devnull

    def resolve(path, dir_fd) -> str:
        if isinstance(path, int):  # a descriptor: where its /proc link points
            path = f"/proc/self/fd/{path}"
        path = fsdecode(fspath(path))
        if dir_fd is not None and dir_fd >= 0 and not path.startswith("/"):  # -1: no dir_fd
            path = f"/proc/self/fd/{dir_fd}/{path}"
        return realpath(path)

    def inside(resolved: str) -> bool:
        return resolved == folder or resolved.startswith(prefix)

    def refuse(event: str, what, kind=PermissionError) -> None:
        message = f"sandbox: {event} {what!r} refused" if what is not None else f"sandbox: {event} refused"
        refused.append(message)
        raise kind(message)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):  # an open descriptor keeps the access it was opened with
                return
            writing = bool((flags or 0) & write_flags) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            where = resolve(path, None)
            if not inside(where) and where != devnull and (writing or isdir(where)):
                refuse(event, path)
        elif event in paths:
            for at, dir_at in paths[event]:
                if not inside(resolve(args[at], None if dir_at is None else args[dir_at])):
                    refuse(event, args[at])
        elif event in refused_events or event.partition(".")[0] in families:
            refuse(event, None)
        elif event == "import" and args[0] in imports:
            refuse(event, args[0], ImportError)
        elif event == "os.kill" and args[0] not in (0, pid, -pgid):
            refuse(event, args[0])
        elif event == "os.killpg" and args[0] not in (0, pgid):
            refuse(event, args[0])

    return hook


if __name__ == "__main__":
    _child()
