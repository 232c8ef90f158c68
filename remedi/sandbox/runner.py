"""Run generated Python programs outside the evaluating process, contained and time/memory limited.

Every call of :func:`run_program` starts one fresh child interpreter (``sys.executable -I -S -B``: isolated
mode, no ``site``/user site, ``PYTHON*`` variables ignored, no ``.pyc`` writes) in its own session
(``start_new_session=True``), with ``cwd`` a fresh :class:`tempfile.TemporaryDirectory` that is removed
afterwards, stdin from ``/dev/null`` and a minimal environment (``PATH=/usr/bin:/bin``, ``HOME`` and
``TMPDIR`` = the temp dir, ``LANG=C.UTF-8``, nothing else). The program text is written to ``main.py`` in
that directory and executed as ``__main__`` by a small bootstrap script (``sandbox_child.py``) that first
contains the process, then runs the code. The parent enforces the wall-clock limit with a deadline and
``killpg(SIGKILL)`` of the child's process group, and only keeps the last ``max_output_bytes`` of stdout and
stderr (read continuously, so a chatty program cannot block or exhaust the parent).

Containment layers, strongest first. Each one is tried in the child and silently skipped when the kernel or
the privileges do not allow it; what was actually applied is reported back through a private pipe *before*
any user code runs and lands in :attr:`ExecResult.containment` (:func:`containment` probes it once):

1. **Namespaces** (Linux; ``os.unshare`` on 3.12+, else libc ``unshare`` through ``ctypes``):
   ``CLONE_NEWNET`` gives the child a network namespace with only a downed loopback (nothing, not even
   127.0.0.1 of the host, is reachable); ``CLONE_NEWNS`` gives it a private mount namespace in which every
   mount is bind-remounted read-only except the temp dir (bind-mounted onto itself, ``nosuid,nodev``).
   Needs ``CAP_SYS_ADMIN`` (root); without it the child tries an unprivileged user namespace
   (``CLONE_NEWUSER``, own uid/gid mapped to itself) for the same effect.
2. **Landlock** (syscalls 444-446): every write-type filesystem right (write/truncate files, create/remove/
   rename/link entries) is denied except beneath the temp dir and on ``/dev/null``; with ABI >= 4 TCP
   bind/connect are denied when ``network=False``; with ABI >= 6 signals to processes outside the sandbox and
   abstract unix sockets are scoped away. ``no_new_privs`` is set first, and Landlock cannot be undone.
3. **Capabilities**: the bounding set and every capability set are cleared (``capset``), so the child,
   even when running as uid 0, can neither remount nor undo anything above.
4. **seccomp-BPF** (x86-64 only): process creation is refused (``fork``/``vfork``, ``clone`` without
   ``CLONE_THREAD``, ``clone3`` answers ``ENOSYS`` so glibc falls back to ``clone`` for threads); ``socket``
   is refused when ``network=False``; signals only to the child itself; mount/namespace/ptrace/bpf/
   io_uring/keyring/module/kexec/reboot/clock-setting syscalls are refused; foreign ABIs are killed.
5. **Resource limits** (``setrlimit`` in the child, after the layers above and before the user code is
   even compiled; not through ``preexec_fn``, which is unsafe while :func:`run_many` threads run): ``RLIMIT_AS``
   (memory), ``RLIMIT_CPU`` (soft = ``cpu_s``, hard one second later), ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``,
   ``RLIMIT_CORE`` 0. ``RLIMIT_NPROC`` counts *all* processes of the real uid and is ignored for root, so it
   is only set for a non-root user when seccomp is unavailable (current count + a small margin); process
   creation is otherwise stopped by seccomp and the guard.
6. **Guard prelude** (always, pure Python, in the spirit of HumanEval's ``reliability_guard``): ``open``/
   ``io.open``/``io.FileIO``/``os.open`` refuse writing outside the temp dir (``/dev/null`` allowed); path
   mutators (``os.remove``, ``rename``, ``mkdir``, ``chmod``, ``truncate``, ``symlink``...) refuse paths
   outside it; ``os.system``/``popen``/``fork``/``exec*``/``spawn*``/``posix_spawn``/``kill``/``killpg``,
   ``subprocess.Popen`` (so ``run``/``call``/``check_output``), ``shutil.rmtree/move/chown`` and, when
   ``network=False``, sockets are disabled; ``ctypes``, ``resource`` and ``psutil`` cannot be imported. The
   guard is a convenience layer (pure Python can always find a way around it); the kernel layers above are
   what actually contain the program.

Measured on the development machine (Linux 6.18 x86-64, running as root): all layers apply -- network
namespace, mount namespace with read-only remounts, Landlock ABI 7, capabilities cleared, seccomp, rlimits
and the guard. Without privileges and user namespaces the kernel write barrier is Landlock alone (kernel
>= 5.13), and without Landlock only the guard stops writes, which a determined program can bypass; the
layers applied are always reported, so a caller can refuse to score when they are too weak.

Status of a run: ``passed`` (exit code 0), ``failed`` (uncaught exception or assertion, any other exit code),
``timeout`` (wall-clock deadline, or the CPU limit: ``SIGXCPU``/``SIGKILL`` at the hard limit), ``memory``
(``MemoryError``, e.g. under ``RLIMIT_AS``, or a crash whose stderr says memory ran out) and ``error`` (the
harness itself failed, or the child died of another signal).

Known gaps: Landlock has no rights for metadata (``chmod``/``chown``/``utime``), so outside the temp dir
those are stopped by the read-only mounts and the guard only; pathname unix sockets are not covered by the
network namespace, only by the seccomp ``socket`` ban and the guard; without seccomp (non-x86-64) process
creation is stopped by the guard (and ``RLIMIT_NPROC`` for non-root users) only. Programs see the real pid
space (no pid namespace) but cannot signal outside themselves. Only the standard library is importable
(``-S``), and the temp dir is not on ``sys.path``. Output a killed program still had buffered is lost.
Like the reference HumanEval harness, a program that calls ``sys.exit(0)``/``os._exit(0)`` before its tests
run counts as passed; exit 0 is the only success criterion.
"""
from __future__ import annotations

import copy
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from remedi.evaluation.sandbox_child import EXIT_MEMORY, EXIT_SETUP  # exit codes the child reports itself

__all__ = ["Limits", "ExecResult", "run_program", "run_many", "pass_at_k", "containment", "STATUSES", "LAYERS"]

STATUSES = ("passed", "failed", "timeout", "memory", "error")

_MIN_MEMORY_MB = 32


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run.

    ``wall_s``: wall-clock deadline enforced by the parent; ``cpu_s``: CPU seconds (``RLIMIT_CPU``, rounded
    up to whole seconds); ``memory_mb``: address space (``RLIMIT_AS``); ``max_output_bytes``: how much of the
    end of stdout and of stderr is kept; ``network``: ``True`` skips every network restriction;
    ``file_size_mb``: largest file the program may write (``RLIMIT_FSIZE``); ``max_open_files``:
    ``RLIMIT_NOFILE``.
    """

    wall_s: float = 10.0
    cpu_s: float = 10.0
    memory_mb: int = 1024
    max_output_bytes: int = 64 * 1024
    network: bool = False
    file_size_mb: int = 16
    max_open_files: int = 256

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"Limits.{name} must be a positive finite number of seconds, got {v!r}")
        for name, lo in (("memory_mb", _MIN_MEMORY_MB), ("max_output_bytes", 0), ("file_size_mb", 0),
                         ("max_open_files", 16)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"Limits.{name} must be an int, got {type(v).__name__} {v!r}")
            if v < lo:
                extra = " (a Python interpreter needs at least that much address space)" if name == "memory_mb" else ""
                raise ValueError(f"Limits.{name} must be >= {lo}{extra}, got {v}")
        if not isinstance(self.network, bool):
            raise ValueError(f"Limits.network must be a bool, got {self.network!r}")


@dataclass
class ExecResult:
    """Outcome of one run; ``stdout``/``stderr`` are the last ``max_output_bytes`` of each stream."""

    status: str
    passed: bool
    returncode: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    reason: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    containment: dict = field(default_factory=dict)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator ``1 - C(n-c, k) / C(n, k)`` (Chen et al., 2021) for ``c`` correct of ``n``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which never forms the large binomials; 1.0 when
    ``n - c < k`` (every k-subset contains a correct sample).
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"pass_at_k: {name} must be an int, got {v!r}")
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# The child side lives in sandbox_child.py; it runs from its text (``-c``), so the child needs neither this
# package nor a readable install path.
_CHILD = (Path(__file__).with_name("sandbox_child.py")).read_text()


class _Tail:
    """Keeps the last ``limit`` bytes of a stream."""

    def __init__(self, limit: int):
        self.limit = limit
        self.buf = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        self.buf += data
        if len(self.buf) > 2 * self.limit + 65536:
            del self.buf[: len(self.buf) - self.limit]

    def text(self) -> tuple[str, bool]:
        data = bytes(self.buf[len(self.buf) - self.limit:]) if self.limit else b""
        return data.decode("utf-8", errors="replace"), self.total > self.limit


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exited_unreaped(pid: int) -> bool:
    """True once ``pid`` has exited; leaves it a zombie so its pid/pgid cannot be reused yet."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _last_line(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        if line.strip():
            return line.strip()[:300]
    return ""


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


_MEMORY_HINTS = ("MemoryError", "Cannot allocate memory", "out of memory", "std::bad_alloc")


def _classify(rc: int | None, timed_out: bool, cpu_used: float, stderr: str, limits: Limits,
              cpu_limit: int) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall-clock limit of {limits.wall_s:g} s exceeded"
    if rc is None:
        return "error", "no exit status"
    if rc == 0:
        return "passed", "exit code 0"
    if rc == EXIT_MEMORY:
        return "memory", f"MemoryError (memory limit {limits.memory_mb} MiB)"
    if rc == EXIT_SETUP:
        return "error", "sandbox setup failed: " + _last_line(stderr)
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= cpu_limit - 0.05):
            return "timeout", f"CPU time limit of {cpu_limit} s exceeded"
        if sig == signal.SIGKILL:
            return "memory", "killed by SIGKILL (most likely out of memory)"
        if any(h in stderr for h in _MEMORY_HINTS):
            return "memory", f"killed by {_signal_name(sig)} after running out of memory"
        return "error", f"killed by {_signal_name(sig)}"
    last = _last_line(stderr)
    if last.startswith("MemoryError"):
        return "memory", f"MemoryError (memory limit {limits.memory_mb} MiB)"
    if last:
        return "failed", last
    return "failed", f"exit code {rc}"


LAYERS = ("namespaces", "landlock", "capabilities", "seccomp", "guard")


def _check_disable(disable: Iterable[str]) -> tuple[str, ...]:
    if isinstance(disable, str):
        disable = (disable,)
    out = tuple(sorted(set(disable)))
    bad = [x for x in out if x not in LAYERS]
    if bad:
        raise ValueError(f"unknown containment layer(s) {bad}; valid names: {list(LAYERS)}")
    return out


def run_program(source: str, limits: Limits = Limits(), *, disable: Iterable[str] = ()) -> ExecResult:
    """Run ``source`` as ``__main__`` in a fresh contained child process (see the module docstring).

    ``disable`` names layers of :data:`LAYERS` to leave out; it exists so that tests can check each layer on
    its own (e.g. ``disable=("guard",)`` shows what the kernel alone stops) and is never needed for scoring.
    Never raises for anything the program does; harness failures come back as ``status="error"``.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be str, got {type(source).__name__}")
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a Limits, got {type(limits).__name__}")
    disable = _check_disable(disable)
    exe = sys.executable
    if not exe:
        return ExecResult("error", False, None, 0.0, reason="sys.executable is empty; cannot start a child")
    cpu_limit = max(1, math.ceil(limits.cpu_s))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="remedi-exec-", ignore_cleanup_errors=True) as tmp:
        tmp = os.path.realpath(tmp)
        prog = os.path.join(tmp, "main.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(source)
        report_r, report_w = os.pipe()
        cfg = {"dir": tmp, "prog": prog, "report_fd": report_w, "network": limits.network, "disable": disable,
               "cpu": cpu_limit, "memory": limits.memory_mb * 1024 * 1024,
               "fsize": limits.file_size_mb * 1024 * 1024, "nofile": limits.max_open_files}
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen([exe, "-I", "-S", "-B", "-c", _CHILD, json.dumps(cfg)], cwd=tmp, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(report_w,), close_fds=True, start_new_session=True)
        except OSError as e:
            os.close(report_r)
            os.close(report_w)
            return ExecResult("error", False, None, time.monotonic() - t0, reason=f"could not start child: {e}")
        os.close(report_w)
        try:
            return _drive(proc, report_r, limits, cpu_limit, t0)
        finally:
            if proc.returncode is None:  # only on an unexpected exception in _drive
                _killpg(proc.pid)
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def _drive(proc: subprocess.Popen, report_r: int, limits: Limits, cpu_limit: int, t0: float) -> ExecResult:
    pid = proc.pid
    deadline = t0 + limits.wall_s
    tails = {proc.stdout.fileno(): _Tail(limits.max_output_bytes),
             proc.stderr.fileno(): _Tail(limits.max_output_bytes)}
    report = bytearray()
    timed_out = False
    sel = selectors.DefaultSelector()
    try:
        for fd in (*tails, report_r):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        drain_until = None
        while sel.get_map():
            now = time.monotonic()
            if not timed_out and now >= deadline:
                timed_out = True
                _killpg(pid)
                drain_until = now + 1.0  # the group is dead; collect what is left in the pipes
            if drain_until is not None and now >= drain_until:
                break
            if drain_until is None and _exited_unreaped(pid):
                # Leader gone but a pipe still open: only a stray descendant can hold it. Give it a moment.
                drain_until = now + 0.2
            wait = min((drain_until or deadline) - now, 0.05 if drain_until is None else 0.02)
            for key, _ in sel.select(max(wait, 0.0)):
                fd = key.fd
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(fd)
                    continue
                if fd == report_r:
                    if len(report) < 65536:
                        report += data
                else:
                    tails[fd].add(data)
    finally:
        sel.close()
        os.close(report_r)
    while not _exited_unreaped(pid):
        if time.monotonic() >= deadline:
            timed_out = True
            _killpg(pid)
            break
        time.sleep(0.005)
    _killpg(pid)  # the zombie still holds the pgid: stray members of the group go too
    try:
        _, status, usage = os.wait4(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        cpu_used = usage.ru_utime + usage.ru_stime
    except ChildProcessError:  # reaped behind our back (a waitpid(-1) elsewhere in this process)
        rc, cpu_used = None, 0.0
    proc.returncode = rc if rc is not None else -1
    duration = time.monotonic() - t0
    out, out_trunc = tails[proc.stdout.fileno()].text()
    err, err_trunc = tails[proc.stderr.fileno()].text()
    try:
        rep = json.loads(report.decode()) if report else {}
    except ValueError:
        rep = {}
    contain = {k: list(v) for k, v in rep.get("layers", {}).items()}
    if rep.get("notes"):
        contain["notes"] = list(rep["notes"])
    st, reason = _classify(rc, timed_out, cpu_used, err, limits, cpu_limit)
    return ExecResult(status=st, passed=st == "passed", returncode=rc, duration_s=duration, stdout=out, stderr=err,
                      reason=reason, stdout_truncated=out_trunc, stderr_truncated=err_trunc, containment=contain)


def _safe_run(source: str, limits: Limits, disable: tuple[str, ...]) -> ExecResult:
    try:
        return run_program(source, limits, disable=disable)
    except Exception as e:  # a harness bug must not take down the other samples
        return ExecResult("error", False, None, 0.0, reason=f"harness error: {type(e).__name__}: {e}")


def run_many(sources: Iterable[str], limits: Limits | Sequence[Limits] = Limits(), workers: int | None = None,
             *, disable: Iterable[str] = ()) -> list[ExecResult]:
    """Run several programs concurrently (one thread per running child), results in input order.

    ``limits`` is one :class:`Limits` for all programs or one per program. ``workers`` defaults to the number
    of CPUs (at most 8). Each program has its own process, temp dir and deadline, so one sample's crash,
    timeout or memory blow-up never affects another.
    """
    sources = list(sources)
    disable = _check_disable(disable)
    if isinstance(limits, Limits):
        per = [limits] * len(sources)
    else:
        per = list(limits)
        if len(per) != len(sources) or not all(isinstance(x, Limits) for x in per):
            raise ValueError(f"limits must be one Limits or one per source ({len(sources)}), got {len(per)}")
    if workers is None:
        workers = max(1, min(8, os.cpu_count() or 1))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if not sources:
        return []
    for s in sources:
        if not isinstance(s, str):
            raise TypeError(f"every source must be str, got {type(s).__name__}")
    if workers == 1 or len(sources) == 1:
        return [_safe_run(s, lim, disable) for s, lim in zip(sources, per)]
    with ThreadPoolExecutor(max_workers=min(workers, len(sources)), thread_name_prefix="code-exec") as pool:
        return list(pool.map(_safe_run, sources, per, [disable] * len(sources)))


_probe_lock = threading.Lock()


@lru_cache(maxsize=4)
def _probe(network: bool) -> dict:
    res = run_program("pass\n", Limits(wall_s=30, cpu_s=10, network=network))
    out = dict(res.containment)
    out["probe_status"] = res.status
    return out


def containment(network: bool = False) -> dict:
    """The containment layers a run gets on this machine (probed once with a trivial program, cached).

    Keys ``network``, ``filesystem``, ``process`` and ``limits`` list the layers applied (e.g. ``netns``,
    ``mount-ro``, ``landlock-abi7``, ``seccomp``, ``guard``); ``notes`` says why a layer was skipped;
    ``level`` summarises the strongest write barrier (``mount-namespace``, ``landlock``, ``guard`` or
    ``none``) and network barrier (``namespace``, ``landlock``, ``seccomp``, ``guard``, ``none`` or
    ``allowed``).
    """
    with _probe_lock:
        info = copy.deepcopy(_probe(bool(network)))
    fs = info.get("filesystem", [])
    net = info.get("network", [])
    fs_level = ("mount-namespace" if "mount-ro" in fs else
                "landlock" if any(x.startswith("landlock") for x in fs) else "guard" if "guard" in fs else "none")
    if network:
        net_level = "allowed"
    else:
        net_level = ("namespace" if "netns" in net else "landlock" if "landlock-tcp" in net else
                     "seccomp" if "seccomp" in net else "guard" if "guard" in net else "none")
    info["level"] = {"filesystem": fs_level, "network": net_level}
    return info

