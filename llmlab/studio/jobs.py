"""The studio's job queue: llmlab commands run as child processes, one at a time per device; and,
every `SCAN_S`, the registry's scan (run folders copied into the workspace, runs whose process died).

A job is an `llmlab` command line (`pretrain configs/x.yaml`, `data prepare ...`, `eval ...`)
run in the workspace, in its own session, by `python -m llmlab.studio.jobrun JOB_DIR -- ARGS...`
(`jobrun.py`: a small parent that passes SIGTERM and SIGINT on, so that a training run saves and
exits, and writes the command's exit code to `JOB_DIR/exit_code` when it ends). Its output goes to
`JOB_DIR/log.txt`. Since each job has its own session, the studio can stop, crash
or restart while jobs run: on start it adopts those still running and settles those that ended
from their exit-code files.

Long-lived services (`llmlab serve` from the Deploy page) are jobs that take no device slot.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from llmlab.common import pid_alive
from llmlab.studio.store import Store, StudioError
from llmlab.track import Registry

JOBS = Path(".llmlab") / "jobs"
POLL_S = 0.5
SCAN_S = 5.0  # how often the registry indexes run folders copied in and marks runs whose process died
SERVICES = ("serve",)  # kinds that run beside the queue


def job_dir(workspace: Path, job_id: int) -> Path:
    return workspace / JOBS / str(job_id)


def log_tail(workspace: Path, job_id: int, max_bytes: int = 16384) -> str:
    """The end of a job's log (its last `max_bytes`, cut to whole lines)."""
    log = job_dir(workspace, job_id) / "log.txt"
    try:
        with open(log, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    if size > max_bytes:
        data = data.split(b"\n", 1)[-1]
    return data.decode("utf-8", "replace")


class JobQueue:
    """Starts queued jobs on free devices and settles ended ones, from a background thread."""

    def __init__(self, workspace: Path, devices: tuple[str, ...] = ("cpu",)):
        self.workspace = Path(workspace)
        self.devices = devices
        self.store = Store(workspace)  # its own connection: the thread's
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._children: dict[int, subprocess.Popen] = {}
        self._scanned = 0.0
        self._held = None  # the workspace's studio lock, while started
        self._thread = threading.Thread(target=self._loop, name="llmlab-jobs", daemon=True)

    def start(self) -> None:
        """Take the workspace's studio lock, adopt the jobs an earlier studio left, start watching."""
        if self._held is not None:
            return
        self._held = _lock(self.workspace)
        self.scan()
        self.tick()
        self._thread.start()

    def scan(self) -> None:
        with Registry(self.workspace) as registry:
            registry.scan()
        self._scanned = time.monotonic()

    def close(self) -> None:
        """Stop watching; the jobs themselves go on (their own sessions)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.store.close()
        if self._held is not None:
            self._held.close()  # the lock goes with the file

    def submit(self, kind: str, title: str, argv: list[str], owner: str, run: str | None = None) -> int:
        with self._lock:
            job_id = self.store.add_job(kind, title, argv, run, owner, None)
        self.tick()
        return job_id

    def active(self, run: str) -> bool:
        """Whether a queued or running job writes the run folder `run`."""
        return bool(self.store.jobs("queued", "running", run=run, limit=1))

    def stop(self, job_id: int) -> None:
        """Ask a running job to stop (SIGTERM: a training run saves first); drop a queued one."""
        with self._lock:
            job = self.store.job(job_id)
            if job is None:
                raise StudioError(f"no job {job_id}")
            if job["status"] == "queued":
                self.store.update_job(job_id, status="stopped", ended=time.time())
                return
            if job["status"] != "running":
                raise StudioError(f"job {job_id} is {job['status']}, not running")
            self.store.update_job(job_id, stopping=1)
            if job["pid"] and pid_alive(job["pid"]):  # the job's parent passes the signal on to its command
                _signal(job["pid"], signal.SIGTERM)
            elif job["pid"]:  # the parent is gone (killed): signal what it started, its process group
                try:
                    os.killpg(job["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def tick(self) -> None:
        """Settle the jobs that ended, then start queued ones on free devices."""
        with self._lock:
            for job in self.store.jobs("running"):
                self._settle(job)
            busy = {j["device"] for j in self.store.jobs("running") if j["kind"] not in SERVICES}
            for job in reversed(self.store.jobs("queued")):  # the oldest first
                if job["kind"] in SERVICES:
                    self._launch(job, None)
                    continue
                free = [d for d in self.devices if d not in busy]
                if not free:
                    continue
                self._launch(job, free[0])
                busy.add(free[0])

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.tick()
                if time.monotonic() - self._scanned > SCAN_S:
                    self.scan()
            except Exception as e:  # a locked or vanished database: try again at the next tick
                print(f"llmlab studio: job queue: {e}", file=sys.stderr)

    def _launch(self, job: dict, device: str | None) -> None:
        try:
            self._start(job, device)
        except OSError as e:  # a workspace that cannot be written: the job fails, the queue goes on
            print(f"llmlab studio: job {job['id']} cannot start: {e}", file=sys.stderr)
            self.store.update_job(job["id"], status="failed", ended=time.time())

    def _start(self, job: dict, device: str | None) -> None:
        folder = job_dir(self.workspace, job["id"])
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", LLMLAB_USER=job["owner"] or "")
        if device and device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        with open(folder / "log.txt", "ab") as log:
            child = subprocess.Popen([sys.executable, "-m", "llmlab.studio.jobrun", str(folder), "--", *job["argv"]],
                                     cwd=self.workspace, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self._children[job["id"]] = child
        self.store.update_job(job["id"], status="running", pid=child.pid, device=device, started=time.time())

    def _run_status(self, run: str) -> str:
        with Registry(self.workspace) as registry:
            record = registry.run(self.workspace / run)
        return record["status"] if record and record["status"] != "running" else "failed"

    def _settle(self, job: dict) -> None:
        child = self._children.get(job["id"])
        if child is not None:
            if child.poll() is None:
                return
            del self._children[job["id"]]
        if _group_alive(job["pid"]):
            return  # still running (started by an earlier studio, or orphaned by a killed parent)
        code = _exit_code(job_dir(self.workspace, job["id"]))
        if code is None:  # its parent was killed: a run says itself how it ended
            status = self._run_status(job["run"]) if job["run"] else "failed"
        elif code == 0:
            status = "finished"
        else:
            status = "stopped" if job["stopping"] or code in (128 + signal.SIGTERM, 128 + signal.SIGINT) else "failed"
        self.store.update_job(job["id"], status=status, exit_code=code, ended=time.time(), pid=None)


def _lock(workspace: Path):
    """The workspace's studio lock (an open file holding an exclusive flock), or StudioError naming
    the process that holds it: two studios would start each queued job twice."""
    import fcntl

    file = open(workspace / ".llmlab" / "studio.lock", "a+")  # noqa: SIM115 (held for the studio's life)
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        raise StudioError(f"{workspace}: another llmlab studio serves this workspace (pid {holder}); stop it "
                          "first, or open that one") from None
    file.truncate(0)
    file.write(str(os.getpid()))
    file.flush()
    return file


def _exit_code(folder: Path) -> int | None:
    try:
        return int((folder / "exit_code").read_text())
    except (OSError, ValueError):
        return None


def _group_alive(pgid: int | None) -> bool:
    """Whether any process of the group `pgid` (a job's parent and what it started) still runs."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid_alive(pgid) or _group_has_live_member(pgid)


def _group_has_live_member(pgid: int) -> bool:
    """A process of the group other than a zombie leader (Linux /proc; elsewhere, assume so)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _signal(pid: int | None, signum: int) -> None:
    if pid:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
