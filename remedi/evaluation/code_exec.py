"""Run generated Python programs outside the evaluating process, contained and time/memory limited.

Every call of :func:`run_program` starts one fresh child interpreter (``sys.executable -I -S -B``: isolated
mode, no ``site``/user site, ``PYTHON*`` variables ignored, no ``.pyc`` writes) in its own session
(``start_new_session=True``), with ``cwd`` a fresh :class:`tempfile.TemporaryDirectory` that is removed
afterwards, stdin from ``/dev/null`` and a minimal environment (``PATH=/usr/bin:/bin``, ``HOME`` and
``TMPDIR`` = the temp dir, ``LANG=C.UTF-8``, nothing else). The program text is written to ``main.py`` in
that directory and executed as ``__main__`` by a small bootstrap script (``_CHILD`` below) that first
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
from typing import Iterable, Sequence

__all__ = ["Limits", "ExecResult", "run_program", "run_many", "pass_at_k", "containment", "STATUSES", "LAYERS"]

STATUSES = ("passed", "failed", "timeout", "memory", "error")

# Exit codes the child script uses for outcomes it recognises itself.
_EXIT_MEMORY = 113
_EXIT_SETUP = 114
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


# --------------------------------------------------------------------------------------------------------
# The child script. It runs as ``python -I -S -B -c _CHILD <config json>`` with cwd = the temp dir: contain
# the process, report the layers on the report fd, close it, install the guard, then run main.py.
# --------------------------------------------------------------------------------------------------------
_CHILD = r'''
import os, sys, json
_cfg = json.loads(sys.argv[1])


def _contain(cfg):
    layers = {"network": [], "filesystem": [], "process": [], "limits": []}
    notes = []
    root = cfg["dir"]
    want_net = not cfg["network"]
    off = set(cfg["disable"])
    linux = sys.platform.startswith("linux")
    libc = None
    ctypes = None
    if linux:
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
        except Exception as e:
            notes.append("ctypes unavailable: %r" % (e,))
            libc = None

    def err():
        e = ctypes.get_errno()
        return OSError(e, os.strerror(e))

    def prctl(*args):
        r = libc.prctl(*[ctypes.c_ulong(a) for a in args])
        if r != 0:
            raise err()
        return r

    # ---- 1. namespaces ----------------------------------------------------------------------------
    CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
    mount_ns = False

    def unshare(flags):
        if hasattr(os, "unshare"):
            os.unshare(flags)
        elif libc.unshare(ctypes.c_int(flags)) != 0:
            raise err()

    if libc is not None and "namespaces" not in off:
        flags = CLONE_NEWNS | (CLONE_NEWNET if want_net else 0)
        try:
            unshare(flags)
            ok = True
        except OSError as e:
            notes.append("unshare: %s" % (e,))
            ok = False
        if not ok:
            uid, gid = os.getuid(), os.getgid()
            try:
                unshare(flags | CLONE_NEWUSER)
                for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                                   ("gid_map", "%d %d 1" % (gid, gid))):
                    with open("/proc/self/" + name, "w") as f:
                        f.write(text)
                ok = True
                layers["process"].append("userns")
            except OSError as e:
                notes.append("unshare with a user namespace: %s" % (e,))
        if ok:
            mount_ns = True
            if want_net:
                layers["network"].append("netns")

    # ---- mounts: everything read-only except the temp dir -------------------------------------------
    if mount_ns:
        MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
        MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
        MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
        keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                               ctypes.c_void_p]

        def mount(src, target, flags):
            if libc.mount(src, os.fsencode(target), None, flags, None) != 0:
                raise err()

        def unescape(s):
            out, i = [], 0
            while i < len(s):
                if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
                    out.append(chr(int(s[i + 1:i + 4], 8)))
                    i += 4
                else:
                    out.append(s[i])
                    i += 1
            return "".join(out)

        try:
            mount(None, "/", MS_REC | MS_PRIVATE)
            mount(os.fsencode(root), root, MS_BIND | MS_REC)
            try:
                mount(None, root, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
            except OSError:
                pass
            with open("/proc/self/mountinfo") as f:
                entries = [line.split() for line in f]
            failed, root_ro = [], False
            for parts in entries:
                mp = unescape(parts[4])
                if mp == root or mp.startswith(root.rstrip("/") + "/"):
                    continue
                fl = MS_REMOUNT | MS_BIND | MS_RDONLY
                for opt in parts[5].split(","):
                    fl |= keep.get(opt, 0)
                try:
                    mount(None, mp, fl)
                    if mp == "/":
                        root_ro = True
                except OSError as e:
                    failed.append("%s (%s)" % (mp, e.strerror))
            if root_ro:
                layers["filesystem"].append("mount-ro")
            if failed:
                notes.append("read-only remount failed for: " + ", ".join(failed[:8]))
        except OSError as e:
            notes.append("mount setup: %s" % (e,))
        try:
            os.chdir(root)  # the old cwd still points into the mount underneath the bind mount
        except OSError as e:
            notes.append("chdir: %s" % (e,))

    # ---- 2. no_new_privs + Landlock ------------------------------------------------------------------
    nnp = False
    if libc is not None:
        try:
            prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            nnp = True
        except OSError as e:
            notes.append("no_new_privs: %s" % (e,))
    if libc is not None and nnp and "landlock" not in off:
        try:
            abi = libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
            if abi < 1:
                raise err()
            fs = 0
            for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12):  # write_file, remove_*, make_*
                fs |= 1 << bit
            if abi >= 2:
                fs |= 1 << 13  # refer
            if abi >= 3:
                fs |= 1 << 14  # truncate
            net = 3 if (abi >= 4 and want_net) else 0  # bind_tcp | connect_tcp, no rule allows any
            scoped = 3 if abi >= 6 else 0  # abstract unix sockets | signals

            class RulesetAttr(ctypes.Structure):
                _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

            class PathBeneath(ctypes.Structure):
                _pack_ = 1
                _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

            attr = RulesetAttr(fs, net, scoped)
            size = 8 if abi < 4 else (16 if abi < 6 else 24)
            rfd = libc.syscall(ctypes.c_long(444), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
            if rfd < 0:
                raise err()
            file_rights = (1 << 1) | ((1 << 14) if abi >= 3 else 0)
            for path, allowed in ((root, fs), ("/dev/null", file_rights)):
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                rule = PathBeneath(allowed, pfd)
                r = libc.syscall(ctypes.c_long(445), ctypes.c_int(rfd), ctypes.c_int(1), ctypes.byref(rule),
                                 ctypes.c_uint32(0))
                os.close(pfd)
                if r != 0:
                    raise err()
            if libc.syscall(ctypes.c_long(446), ctypes.c_int(rfd), ctypes.c_uint32(0)) != 0:
                raise err()
            os.close(rfd)
            layers["filesystem"].append("landlock-abi%d" % abi)
            if net:
                layers["network"].append("landlock-tcp")
            if scoped:
                layers["process"].append("landlock-scope")
        except OSError as e:
            notes.append("landlock: %s" % (e,))

    # ---- 3. capabilities -----------------------------------------------------------------------------
    if libc is not None and "capabilities" not in off:
        try:
            try:
                with open("/proc/sys/kernel/cap_last_cap") as f:
                    last = int(f.read())
            except OSError:
                last = 63
            for cap in range(last + 1):
                try:
                    prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
                except OSError:
                    pass
            hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
            data = (ctypes.c_uint32 * 6)()
            if libc.syscall(ctypes.c_long(126), ctypes.byref(hdr), ctypes.byref(data)) != 0:  # capset
                raise err()
            with open("/proc/self/status") as f:
                eff = [ln for ln in f if ln.startswith("CapEff:")]
            if eff and int(eff[0].split()[1], 16) == 0:
                layers["process"].append("no-capabilities")
        except OSError as e:
            notes.append("capabilities: %s" % (e,))

    # ---- 4. seccomp ----------------------------------------------------------------------------------
    seccomp = False
    if libc is not None and nnp and "seccomp" not in off and os.uname().machine == "x86_64":
        try:
            LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
            prog, labels = [], {}

            def emit(code, k=0, jt=0, jf=0):
                prog.append([code, jt, jf, k & 0xFFFFFFFF])

            deny = [57, 58, 101, 129, 155, 159, 161, 163, 164, 165, 166, 167, 168, 169, 170, 171, 172,
                    173, 175, 176, 179, 200, 227, 246, 248, 249, 250, 272, 297, 298, 303, 304, 305, 308,
                    310, 311, 313, 320, 321, 323, 424, 425, 426, 427, 428, 429, 430, 431, 432, 433, 438,
                    442]
            if want_net:
                deny.append(41)  # socket
            pid = os.getpid()
            emit(LD, 4)
            emit(JEQ, 0xC000003E, 0, "kill")  # AUDIT_ARCH_X86_64
            emit(LD, 0)
            emit(JGE, 0x40000000, "eperm", 0)  # x32 ABI
            for nr in deny:
                emit(JEQ, nr, "eperm", 0)
            emit(JEQ, 435, "enosys", 0)  # clone3: glibc falls back to clone
            emit(JEQ, 56, "clone", 0)
            emit(JEQ, 62, "signal", 0)  # kill
            emit(JEQ, 234, "signal", 0)  # tgkill
            emit(RET, 0x7FFF0000)
            labels["clone"] = len(prog)
            emit(LD, 16)
            emit(JSET, 0x00010000, "allow", "eperm")  # CLONE_THREAD
            labels["signal"] = len(prog)
            emit(LD, 16)
            emit(JEQ, pid, "allow", 0)
            emit(JEQ, 0, "allow", 0)
            emit(JEQ, -pid, "allow", "eperm")
            labels["allow"] = len(prog)
            emit(RET, 0x7FFF0000)
            labels["eperm"] = len(prog)
            emit(RET, 0x00050000 | 1)
            labels["enosys"] = len(prog)
            emit(RET, 0x00050000 | 38)
            labels["kill"] = len(prog)
            emit(RET, 0x80000000)

            class SockFilter(ctypes.Structure):
                _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                            ("k", ctypes.c_uint32)]

            class SockFprog(ctypes.Structure):
                _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

            arr = (SockFilter * len(prog))()
            for i, (code, jt, jf, k) in enumerate(prog):
                jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
                jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
                if not (0 <= jt < 256 and 0 <= jf < 256):
                    raise OSError(7, "seccomp jump out of range")
                arr[i] = SockFilter(code, jt, jf, k)
            fprog = SockFprog(len(prog), arr)
            if libc.prctl(ctypes.c_int(22), ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)) != 0:
                raise err()
            seccomp = True
            layers["process"].append("seccomp")
            if want_net:
                layers["network"].append("seccomp")
        except OSError as e:
            notes.append("seccomp: %s" % (e,))

    # ---- 5. resource limits --------------------------------------------------------------------------
    try:
        import resource

        def setlim(name, value, hard=None):
            res = getattr(resource, name, None)
            if res is None:
                return
            cur_soft, cur_hard = resource.getrlimit(res)
            hard = value if hard is None else hard
            if cur_hard != resource.RLIM_INFINITY:
                value, hard = min(value, cur_hard), min(hard, cur_hard)
            try:
                resource.setrlimit(res, (value, hard))
                layers["limits"].append(name[7:].lower())
            except (ValueError, OSError) as e:
                notes.append("%s: %s" % (name, e))

        setlim("RLIMIT_CORE", 0)
        setlim("RLIMIT_CPU", cfg["cpu"], cfg["cpu"] + 1)
        setlim("RLIMIT_FSIZE", cfg["fsize"])
        setlim("RLIMIT_NOFILE", cfg["nofile"])
        if not seccomp and os.geteuid() != 0 and os.path.isdir("/proc"):
            uid, count = os.getuid(), 0
            for name in os.listdir("/proc"):
                if name.isdigit():
                    try:
                        if os.stat("/proc/" + name).st_uid == uid:
                            count += 1
                    except OSError:
                        pass
            setlim("RLIMIT_NPROC", count + 32)
        setlim("RLIMIT_AS", cfg["memory"])
    except ImportError as e:
        notes.append("resource: %s" % (e,))
    return layers, notes



def _install_guard(root, network):
    import builtins, errno, io, _io, posix, shutil, subprocess
    root = os.path.realpath(root)
    prefix = root.rstrip(os.sep) + os.sep
    extra = {"/dev/null"}

    def inside(p):
        if isinstance(p, int):
            return True
        try:
            p = os.fsdecode(os.fspath(p))
        except TypeError:
            return False
        rp = os.path.realpath(p)
        return rp == root or rp.startswith(prefix) or rp in extra

    def refuse(what):
        raise PermissionError(errno.EPERM, "%s is disabled in the sandbox" % what)

    def check(p, what):
        if not inside(p):
            raise PermissionError(errno.EACCES, "%s outside the sandbox directory is not allowed: %r" % (what, p))

    real_open = io.open

    def open(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(ch in mode for ch in "wax+"):
            check(file, "writing")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = open

    real_fileio = _io.FileIO

    class FileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            if isinstance(mode, str) and any(ch in mode for ch in "wax+"):
                check(file, "writing")
            super().__init__(file, mode, *args, **kwargs)

    io.FileIO = _io.FileIO = FileIO

    real_os_open = os.open
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & wflags:
            if dir_fd is not None:
                refuse("os.open for writing with dir_fd")
            check(path, "writing")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def set_both(name, fn):
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, fn)

    set_both("open", os_open)

    def path_guard(name, nargs):
        real = getattr(os, name, None)
        if real is None:
            return

        def wrapper(*args, **kwargs):
            if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None \
                    or kwargs.get("dst_dir_fd") is not None:
                refuse("os.%s with dir_fd" % name)
            for a in args[:nargs]:
                check(a, "os.%s" % name)
            for key in ("path", "src", "dst"):
                if key in kwargs:
                    check(kwargs[key], "os.%s" % name)
            return real(*args, **kwargs)

        wrapper.__name__ = name
        set_both(name, wrapper)

    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "lchmod", "chown", "lchown", "truncate",
                 "utime", "mkfifo", "mknod", "setxattr", "removexattr", "chflags", "lchflags"):
        path_guard(name, 1)
    for name in ("rename", "replace", "link"):
        path_guard(name, 2)
    real_symlink = os.symlink

    def symlink(src, dst, *args, **kwargs):
        check(dst, "os.symlink")
        return real_symlink(src, dst, *args, **kwargs)

    set_both("symlink", symlink)

    def disabled(name):
        def fn(*args, **kwargs):
            refuse(name)
        fn.__name__ = name.rsplit(".", 1)[-1]
        return fn

    for name in ("system", "popen", "fork", "forkpty", "vfork", "execv", "execve", "execl", "execle",
                 "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg",
                 "chroot", "fchmod", "fchown", "pidfd_open", "plock"):
        if hasattr(os, name) or hasattr(posix, name):
            set_both(name, disabled("os." + name))

    def popen_refused(*args, **kwargs):
        refuse("subprocess")

    subprocess.Popen = popen_refused
    for name in ("run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, disabled("subprocess." + name))
    try:
        import _posixsubprocess
        _posixsubprocess.fork_exec = disabled("_posixsubprocess.fork_exec")
    except ImportError:
        pass
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, disabled("shutil." + name))

    if not network:
        import socket, _socket

        class NoSocket(socket.socket):
            def __init__(self, *args, **kwargs):
                refuse("network access")

        socket.socket = socket.SocketType = NoSocket
        _socket.socket = _socket.SocketType = NoSocket
        for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(socket, name):
                setattr(socket, name, disabled("socket." + name))
            if hasattr(_socket, name):
                setattr(_socket, name, disabled("socket." + name))

    for name in ("ctypes", "_ctypes", "resource", "psutil"):
        sys.modules[name] = None


def _main():
    cfg = _cfg
    rfd = cfg["report_fd"]
    try:
        layers, notes = _contain(cfg)
        guard = "guard" not in cfg["disable"]
        if guard:
            layers["filesystem"].append("guard")
            layers["process"].append("guard")
            if not cfg["network"]:
                layers["network"].append("guard")
        report = json.dumps({"layers": layers, "notes": notes}).encode()
        while report:
            report = report[os.write(rfd, report):]
        os.close(rfd)
        with open(cfg["prog"], "rb") as f:
            source = f.read()
        if guard:
            _install_guard(cfg["dir"], cfg["network"])
    except BaseException as e:
        import traceback
        sys.stderr.write("sandbox setup failed: %r\n" % (e,))
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(__EXIT_SETUP__)

    import builtins, types
    mod = types.ModuleType("__main__")
    mod.__file__ = cfg["prog"]
    mod.__builtins__ = builtins
    sys.modules["__main__"] = mod
    sys.argv = [cfg["prog"]]
    try:
        code = compile(source, "main.py", "exec")
        exec(code, mod.__dict__)
    except SystemExit:
        raise
    except MemoryError as e:
        # Free what the program holds before reporting, or printing the traceback fails again.
        import traceback
        traceback.clear_frames(e.__traceback__)
        mod.__dict__.clear()
        code = None
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except BaseException:
                pass
        os._exit(__EXIT_MEMORY__)
    except BaseException as e:
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # without this script's frame
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
        os._exit(1)


_main()
'''.replace("__EXIT_SETUP__", str(_EXIT_SETUP)).replace("__EXIT_MEMORY__", str(_EXIT_MEMORY))


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
    if rc == _EXIT_MEMORY:
        return "memory", f"MemoryError (memory limit {limits.memory_mb} MiB)"
    if rc == _EXIT_SETUP:
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

