"""Run generated Python programs outside the evaluating process, contained and time/memory/disk limited.

Every call of :func:`run_program` starts one fresh interpreter (``python -I -S -B``: isolated mode, no
``site``, ``PYTHON*`` variables ignored, no ``.pyc`` writes) in its own session, stdin from ``/dev/null``, a
minimal environment (``PATH=/usr/bin:/bin``, ``HOME`` = ``TMPDIR`` = the work dir, ``LANG=C.UTF-8``), running
the bootstrap of :mod:`remedi.sandbox.child`, which contains the process and then runs the program as
``__main__``. The parent enforces the wall-clock limit (``killpg(SIGKILL)``), keeps only the last
``max_output_bytes`` of stdout/stderr (read continuously) and decides the verdict.

Layers, outermost first (what was applied comes back in :attr:`ExecResult.containment`):

1. **bubblewrap** (:mod:`remedi.sandbox.bwrap`, default whenever ``bwrap`` runs on the host): user, PID,
   network, IPC and UTS namespaces; an empty read-only root with only the interpreter's files bound
   read-only; the work dir a tmpfs of ``disk_mb``; die-with-parent; new session; no capabilities.
   Without bubblewrap the child makes its own mount (+ network) namespace, a size-capped tmpfs work dir and
   read-only remounts of every other mount (root or user namespaces needed), but it sees the real PID space
   and every readable file: see :func:`require_strong`.
2. **Landlock** (kernel >= 5.13): write rights only beneath the work dir and ``/dev/null``; TCP denied with
   ABI >= 4; signals and abstract sockets scoped with ABI >= 6.
3. **Capabilities** cleared (bounding set too).
4. **seccomp-BPF** (x86-64; :mod:`remedi.sandbox.seccomp`): no process creation, no signals, ``prlimit64``,
   ``F_SETOWN``/``F_SETSIG`` or scheduling calls aimed at other processes, no ``memfd_create``, no
   mount/namespace/ptrace/bpf/io_uring/keyring calls, no ``socket`` when the network is off.
5. **rlimits** set by the child before the program is compiled: ``RLIMIT_AS``, ``RLIMIT_CPU`` (hard one
   second after soft), ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` 0.
6. **Guard** prelude (pure Python, a convenience in the spirit of HumanEval's ``reliability_guard``; code can
   always get around it, the layers above are what contain it).

Verdict: ``passed`` only when the child's marker ``ok <nonce>`` (a random per-run nonce that the child reads
from a pipe and closes before the program starts) arrives on the control pipe and the exit code is 0; the
child writes it, through references saved before the program ran, only after the program reached its end.
``sys.exit(0)``/``os._exit(0)`` before the end, or a replaced ``os._exit``/``traceback.print_exception``, is
``failed``. Other statuses: ``failed`` (exception, assertion, early exit), ``timeout`` (wall-clock deadline,
or the CPU limit), ``memory`` (``MemoryError`` or a crash that ran out of memory) and ``error`` (the harness
failed, or another signal). :attr:`ExecResult.reason` is one sanitised line: the exception type and at most
120 characters of its message, paths outside the work dir replaced by ``<path>``.

What remains possible (documented in the README as well): a program that deliberately attacks the harness
inside its own interpreter can read the marker out of the harness's frame (``sys._getframe``, ``gc``) and
write it itself, or make its results compare equal to anything; the sandbox keeps such a program from harming
the host, other samples or the evaluator, but cannot prove that a hostile program is correct.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import secrets
import selectors
import shutil
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

from remedi.sandbox import bwrap as _bw
from remedi.sandbox.child import EXIT_MEMORY, EXIT_SETUP  # exit codes the child reports itself

__all__ = ["Limits", "ExecResult", "run_program", "run_many", "pass_at_k", "containment", "STATUSES", "LAYERS",
           "REQUIRED", "SandboxError", "missing_layers", "require_strong", "accept_weak_host",
           "clean_stale_dirs"]

STATUSES = ("passed", "failed", "timeout", "memory", "error")
LAYERS = ("bwrap", "namespaces", "landlock", "capabilities", "seccomp", "guard")
# What scoring needs (per report key); "netns" only when the network is off.
REQUIRED = {"process": ("pidns", "seccomp", "no-capabilities"), "filesystem": ("read-confined", "disk-cap"),
            "network": ("netns",), "limits": ("as", "cpu", "fsize")}
ALLOW_FLAG = "--allow_weak_sandbox"

_MIN_MEMORY_MB = 32


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run.

    ``wall_s``: wall-clock deadline enforced by the parent; ``cpu_s``: CPU seconds (``RLIMIT_CPU``, rounded
    up to whole seconds); ``memory_mb``: address space (``RLIMIT_AS``); ``max_output_bytes``: how much of the
    end of stdout and of stderr is kept; ``network``: ``True`` skips every network restriction;
    ``file_size_mb``: largest file the program may write (``RLIMIT_FSIZE``); ``max_open_files``:
    ``RLIMIT_NOFILE``; ``disk_mb``: size of the work dir's tmpfs (everything the program writes, together).
    """

    wall_s: float = 10.0
    cpu_s: float = 10.0
    memory_mb: int = 1024
    max_output_bytes: int = 64 * 1024
    network: bool = False
    file_size_mb: int = 16
    max_open_files: int = 256
    disk_mb: int = 64

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"Limits.{name} must be a positive finite number of seconds, got {v!r}")
        for name, lo in (("memory_mb", _MIN_MEMORY_MB), ("max_output_bytes", 0), ("file_size_mb", 0),
                         ("max_open_files", 16), ("disk_mb", 1)):
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


# The child runs from text (``-c``): seccomp.py's filter builder, then child.py. It needs neither this package
# nor a readable install path.
_HERE = Path(__file__).resolve().parent
_CHILD = (_HERE / "seccomp.py").read_text() + "\n" + (_HERE / "child.py").read_text()
_PREFIX = "remedi-exec-"


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
_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"`,;:()\[\]{}<>]*")


def _tidy(text: str, workdir: str, limit: int = 120) -> str:
    """One printable line of at most ``limit`` characters, every absolute path outside ``workdir`` redacted."""
    keep = workdir.rstrip("/") + "/"
    text = _PATH.sub(lambda m: m.group(0) if (m.group(0) + "/").startswith(keep) else "<path>", text)
    text = "".join(ch if ch.isprintable() else " " for ch in text.replace("\n", " ")).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _exception_reason(info: dict, workdir: str) -> str:
    name = str(info.get("type", ""))
    name = name if re.fullmatch(r"[A-Za-z_][\w.]{0,79}", name) else "Exception"
    msg = _tidy(str(info.get("message") or ""), workdir)
    return f"{name}: {msg}" if msg else name


def _parse_ctl(data: bytes) -> tuple[dict, list[bytes]]:
    """(containment report, the other lines) of the control pipe; only the first line can be the report,
    which the child writes before the program starts."""
    lines = data.split(b"\n")
    rep = {}
    if lines and lines[0].startswith(b"report "):
        try:
            rep = json.loads(lines[0][7:].decode())
        except ValueError:
            rep = {}
        lines = lines[1:]
    return (rep if isinstance(rep, dict) else {}), lines


def _classify(rc: int | None, timed_out: bool, cpu_used: float, stderr: str, limits: Limits, cpu_limit: int,
              marked: bool, failure: dict | None, workdir: str) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall-clock limit of {limits.wall_s:g} s exceeded"
    if rc is None:
        return "error", "no exit status"
    if rc == 0 and marked:
        return "passed", "ran to the end"
    if rc == EXIT_SETUP:
        return "error", "sandbox setup failed: " + _tidy(_last_line(stderr), workdir, 200)
    if rc == EXIT_MEMORY or (failure or {}).get("type") == "MemoryError":
        return "memory", f"MemoryError (memory limit {limits.memory_mb} MiB)"
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= cpu_limit - 0.05):
            return "timeout", f"CPU time limit of {cpu_limit} s exceeded"
        if sig == signal.SIGKILL:
            return "memory", "killed by SIGKILL (most likely out of memory)"
        if any(h in stderr for h in _MEMORY_HINTS):
            return "memory", f"killed by {_signal_name(sig)} after running out of memory"
        return "error", f"killed by {_signal_name(sig)}"
    if failure and "exit" in failure:
        return "failed", f"SystemExit({failure['exit']}) before the program's end"
    if failure:
        return "failed", _exception_reason(failure, workdir)
    return "failed", f"exited with code {rc} before the program's end (no completion marker)"


def _check_disable(disable: Iterable[str]) -> tuple[str, ...]:
    if isinstance(disable, str):
        disable = (disable,)
    out = tuple(sorted(set(disable)))
    bad = [x for x in out if x not in LAYERS]
    if bad:
        raise ValueError(f"unknown containment layer(s) {bad}; valid names: {list(LAYERS)}")
    return out


_PID_DIR = re.compile(re.escape(_PREFIX) + r"(\d+)-")
_cleaned = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_dirs(tmp: str | None = None) -> list[str]:
    """Remove ``remedi-exec-<pid>-*`` folders (of the fallback path) whose evaluator process is gone."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    for name in names:
        m = _PID_DIR.match(name)
        path = os.path.join(tmp, name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))) and os.path.isdir(path) \
                and os.stat(path).st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _clean_once() -> None:
    global _cleaned
    if not _cleaned:
        _cleaned = True
        clean_stale_dirs()


@lru_cache(maxsize=8)
def _bwrap_for(exe: str, bw: str | None) -> tuple[str | None, str]:
    """(``bw`` if it can run a sandboxed interpreter here, else None; why not)."""
    if not bw:
        return None, "bwrap: not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    r, w = os.pipe()
    try:
        os.write(w, b"pass\n")
        os.close(w)
        cmd = _bw.command(bw, exe, _bw.WORK_PARENT + "/remedi-exec-check", r, 1 << 20, False)
        p = subprocess.run(cmd + ["-I", "-S", "-B", "-c", "import os; os.stat('main.py')"], pass_fds=(r,),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"bwrap: cannot run: {e}"
    finally:
        os.close(r)
    if p.returncode != 0:
        return None, "bwrap: cannot run here: " + _last_line(p.stderr)
    return bw, ""


def run_program(source: str, limits: Limits = Limits(), *, disable: Iterable[str] = ()) -> ExecResult:
    """Run ``source`` as ``__main__`` in a fresh contained child process (see the module docstring).

    ``disable`` names layers of :data:`LAYERS` to leave out; it exists so that tests can check each layer on
    its own (e.g. ``disable=("guard",)`` shows what the kernel alone stops, ``("bwrap",)`` the fallback path)
    and is never needed for scoring. Never raises for anything the program does; harness failures come back
    as ``status="error"``.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be str, got {type(source).__name__}")
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a Limits, got {type(limits).__name__}")
    disable = _check_disable(disable)
    exe = sys.executable
    if not exe:
        return ExecResult("error", False, None, 0.0, reason="sys.executable is empty; cannot start a child")
    _clean_once()
    bw, why = (None, "bwrap: disabled") if "bwrap" in disable else _bwrap_for(exe, _bw.find_bwrap())
    t0 = time.monotonic()
    if bw:
        return _run(source, limits, disable, exe, bw, None, t0)
    with tempfile.TemporaryDirectory(prefix=f"{_PREFIX}{os.getpid()}-", ignore_cleanup_errors=True) as tmp:
        res = _run(source, limits, disable, exe, None, os.path.realpath(tmp), t0)
    res.containment.setdefault("notes", []).insert(0, why)
    return res


def _run(source: str, limits: Limits, disable: tuple[str, ...], exe: str, bw: str | None, host_dir: str | None,
         t0: float) -> ExecResult:
    cpu_limit = max(1, math.ceil(limits.cpu_s))
    data = source.encode("utf-8", errors="surrogateescape")
    nonce = secrets.token_hex(24)
    fds = []  # every descriptor of ours to close once the child has them

    def pipe():
        r, w = os.pipe()
        fds.extend((r, w))
        return r, w

    try:
        if bw:
            workdir = f"{_bw.WORK_PARENT}/{_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
            prog_fd = os.memfd_create("remedi-program") if hasattr(os, "memfd_create") else \
                os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR, 0o600)
            fds.append(prog_fd)
            os.write(prog_fd, data)
            os.lseek(prog_fd, 0, os.SEEK_SET)
        else:
            workdir = host_dir
            with open(os.path.join(workdir, "main.py"), "wb") as f:
                f.write(data)
        nonce_r, nonce_w = pipe()
        os.write(nonce_w, nonce.encode())  # 48 bytes: fits any pipe buffer
        ctl_r, ctl_w = pipe()
        cfg = {"dir": workdir, "prog": workdir + "/main.py", "ctl_fd": ctl_w, "nonce_fd": nonce_r,
               "network": limits.network, "disable": disable, "cpu": cpu_limit,
               "memory": limits.memory_mb << 20, "fsize": limits.file_size_mb << 20, "nofile": limits.max_open_files,
               "disk": limits.disk_mb << 20, "outer": "bwrap" if bw else None}
        argv = ["-I", "-S", "-B", "-c", _CHILD, json.dumps(cfg)]
        if bw:
            argv = _bw.command(bw, exe, workdir, prog_fd, limits.disk_mb << 20, limits.network) + argv
            passed_fds = (prog_fd, nonce_r, ctl_w)
        else:
            argv = [exe] + argv
            passed_fds = (nonce_r, ctl_w)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen(argv, cwd=host_dir or "/", env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=passed_fds,
                                    close_fds=True, start_new_session=True)
        except OSError as e:
            return ExecResult("error", False, None, time.monotonic() - t0, reason=f"could not start child: {e}")
        for fd in fds:
            if fd != ctl_r:
                os.close(fd)
        fds = [ctl_r]
        try:
            return _drive(proc, ctl_r, limits, cpu_limit, t0, nonce, workdir, signal_rc=bool(bw))
        finally:
            fds = []  # _drive closed ctl_r
            if proc.returncode is None:  # only on an unexpected exception in _drive
                _killpg(proc.pid)
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _drive(proc: subprocess.Popen, ctl_r: int, limits: Limits, cpu_limit: int, t0: float, nonce: str,
           workdir: str, signal_rc: bool) -> ExecResult:
    pid = proc.pid
    deadline = t0 + limits.wall_s
    tails = {proc.stdout.fileno(): _Tail(limits.max_output_bytes),
             proc.stderr.fileno(): _Tail(limits.max_output_bytes)}
    ctl = bytearray()
    timed_out = False
    sel = selectors.DefaultSelector()
    try:
        for fd in (*tails, ctl_r):
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
                if fd == ctl_r:
                    if len(ctl) < 65536:
                        ctl += data
                else:
                    tails[fd].add(data)
    finally:
        sel.close()
        os.close(ctl_r)
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
    if signal_rc and rc is not None and 128 < rc < 128 + 65:
        rc = -(rc - 128)  # bwrap exits with 128 + the signal that killed the sandboxed program
    duration = time.monotonic() - t0
    out, out_trunc = tails[proc.stdout.fileno()].text()
    err, err_trunc = tails[proc.stderr.fileno()].text()
    rep, lines = _parse_ctl(bytes(ctl))
    marked = f"ok {nonce}".encode() in lines
    failure = None
    for line in reversed(lines):  # the child's own line is the last one it wrote
        if line.startswith(b"failed "):
            try:
                failure = json.loads(line[7:].decode(errors="replace"))
            except ValueError:
                failure = None
            failure = failure if isinstance(failure, dict) else None
            break
    contain = {k: list(v) for k, v in rep.get("layers", {}).items()} if isinstance(rep.get("layers"), dict) else {}
    if rep.get("notes"):
        contain["notes"] = list(rep["notes"])
    st, reason = _classify(rc, timed_out, cpu_used, err, limits, cpu_limit, marked, failure, workdir)
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


@lru_cache(maxsize=8)
def _probe(network: bool, bwrap: str | None) -> dict:
    res = run_program("pass\n", Limits(wall_s=30, cpu_s=10, network=network))
    out = dict(res.containment)
    out["probe_status"] = res.status
    return out


def containment(network: bool = False) -> dict:
    """The containment layers a run gets on this machine (probed once with a trivial program, cached).

    Keys ``network``, ``filesystem``, ``process`` and ``limits`` list the layers applied (e.g. ``netns``,
    ``read-confined``, ``disk-cap``, ``pidns``, ``landlock-abi7``, ``seccomp``, ``guard``); ``notes`` says why
    a layer was skipped; ``level`` summarises the strongest read/write barrier (``bwrap``,
    ``mount-namespace``, ``landlock``, ``guard`` or ``none``) and network barrier (``namespace``,
    ``landlock``, ``seccomp``, ``guard``, ``none`` or ``allowed``); ``missing`` lists the layers of
    :data:`REQUIRED` that did not apply.
    """
    with _probe_lock:
        info = copy.deepcopy(_probe(bool(network), _bw.find_bwrap()))
    fs = info.get("filesystem", [])
    net = info.get("network", [])
    fs_level = ("bwrap" if "read-confined" in fs else "mount-namespace" if "mount-ro" in fs else
                "landlock" if any(x.startswith("landlock") for x in fs) else "guard" if "guard" in fs else "none")
    if network:
        net_level = "allowed"
    else:
        net_level = ("namespace" if "netns" in net else "landlock" if "landlock-tcp" in net else
                     "seccomp" if "seccomp" in net else "guard" if "guard" in net else "none")
    info["level"] = {"filesystem": fs_level, "network": net_level}
    info["missing"] = [name for key, names in REQUIRED.items() for name in names
                       if not (key == "network" and network) and name not in info.get(key, [])]
    return info


class SandboxError(ValueError):
    """The host cannot contain generated code well enough to score it (see :func:`require_strong`); a
    ValueError so that the scripts print it as their one ``error:`` line."""


_accepted_weak = False


def accept_weak_host(accept: bool = True) -> None:
    """Let :func:`require_strong` pass on a weak host for the rest of this process (``--allow_weak_sandbox``)."""
    global _accepted_weak
    _accepted_weak = bool(accept)


def missing_layers(network: bool = False) -> list[str]:
    """The layers of :data:`REQUIRED` this host does not give a sample."""
    return containment(network)["missing"]


_WHY = {"pidns": "bubblewrap", "read-confined": "bubblewrap", "disk-cap": "bubblewrap or a mount namespace",
        "netns": "bubblewrap or a network namespace", "seccomp": "seccomp-BPF on x86-64",
        "no-capabilities": "capset", "as": "RLIMIT_AS", "cpu": "RLIMIT_CPU", "fsize": "RLIMIT_FSIZE"}


def require_strong(network: bool = False) -> None:
    """Raise :class:`SandboxError` (one line: the missing layers, the fix, the flag that accepts the risk)
    unless every layer of :data:`REQUIRED` applies here or :func:`accept_weak_host` was called."""
    if _accepted_weak:
        return
    info = containment(network)
    missing = info["missing"]
    if not missing:
        return
    notes = "; ".join(n for n in info.get("notes", []) if n.startswith(("bwrap", "seccomp")))
    raise SandboxError(
        "the code sandbox on this host lacks " + ", ".join(f"{m} ({_WHY.get(m, m)})" for m in missing)
        + (f" [{notes}]" if notes else "") + "; install bubblewrap (apt-get install bubblewrap) on x86-64 Linux, "
        f"or pass {ALLOW_FLAG} to score generated code with these layers missing at your own risk")
