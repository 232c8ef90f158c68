"""The outer layer: bubblewrap (``bwrap``, the Flatpak sandbox) command line for one sample.

Each sample runs as ``bwrap <options> -- <python> -I -S -B -c <child text> <config>``, where the options give it

* new user, PID, network (unless ``network=True``), IPC, UTS and cgroup namespaces (``--unshare-all``): it
  sees only its own processes, so it can neither find nor change the evaluator or other samples;
* a file system built from nothing: a read-only empty root with, bound read-only, only the interpreter's own
  files (the executable, its shared libraries as ``ldd`` resolves them, the standard library without
  ``site-packages``, ``/etc/ld.so.cache``), ``/proc`` of its own PID namespace, a minimal read-only ``/dev``,
  and the work dir: a tmpfs of at most ``Limits.disk_mb`` holding ``main.py`` (copied in from a file
  descriptor, so no folder of the evaluator is visible or needed);
* ``--die-with-parent`` (killed when the evaluator dies), ``--new-session`` (no terminal to inject into) and
  ``--cap-drop ALL``.

Nothing else of the host (home folders, the repo, model files, datasets, other samples) exists inside.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig
from functools import lru_cache

WORK_PARENT = "/tmp"  # the work dir inside the sandbox is WORK_PARENT/remedi-exec-<random>


def find_bwrap() -> str | None:
    """Path of the bwrap executable, or None; ``REMEDI_BWRAP`` overrides (``none`` turns the layer off)."""
    env = os.environ.get("REMEDI_BWRAP")
    if env is not None:
        return None if env.strip().lower() in ("", "none", "0") else env
    return shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin:" + os.environ.get("PATH", ""))


def _ldd(files: list[str]) -> set[str]:
    """Shared libraries the given ELF files load, as the dynamic loader resolves them."""
    ldd = shutil.which("ldd", path="/usr/bin:/bin")
    if not ldd or not files:
        return set()
    out = subprocess.run([ldd, *files], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}).stdout
    libs = set()
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            i = parts.index("=>")
            if i + 1 < len(parts) and parts[i + 1].startswith("/"):
                libs.add(parts[i + 1])
        elif parts and parts[0].startswith("/") and not line.endswith(":"):
            libs.add(parts[0])
    return libs


@lru_cache(maxsize=4)
def interpreter_binds(exe: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """``((source, destination) read-only binds, folders to hide)`` that let ``exe -I -S`` run the stdlib.

    The executable is bound at its real path (a venv's ``python`` symlink is resolved, so ``pyvenv.cfg`` is
    not consulted); each library at the path the loader asks for; the standard library folder whole, with its
    ``site-packages`` hidden under an empty read-only tmpfs.
    """
    real = os.path.realpath(exe)
    paths = sysconfig.get_paths()
    stdlib = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if paths.get(k)}
    dynload = [p for d in stdlib for p in glob.glob(os.path.join(d, "lib-dynload", "*.so"))]
    binds = {real: real}
    for lib in _ldd([real, *dynload]):
        binds[lib] = os.path.realpath(lib)
    if os.path.isfile("/etc/ld.so.cache"):
        binds["/etc/ld.so.cache"] = "/etc/ld.so.cache"
    for d in stdlib:
        binds[d] = d
    hide = tuple(sorted(os.path.join(d, s) for d in stdlib for s in ("site-packages", "dist-packages")
                        if os.path.isdir(os.path.join(d, s))))
    pairs = tuple(sorted((src, dst) for dst, src in binds.items() if os.path.exists(src)))
    return pairs, hide


def command(bwrap: str, exe: str, workdir: str, prog_fd: int, disk_bytes: int, network: bool) -> list[str]:
    """The bwrap argv up to and including ``--`` and the real interpreter path (append its arguments)."""
    binds, hide = interpreter_binds(exe)
    cmd = [bwrap, "--unshare-all"] + (["--share-net"] if network else []) + [
        "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox"]
    for src, dst in binds:
        cmd += ["--ro-bind", src, dst]
    for d in hide:
        cmd += ["--tmpfs", d, "--remount-ro", d]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            "--size", str(disk_bytes), "--tmpfs", workdir, "--file", str(prog_fd), workdir + "/main.py",
            "--chdir", workdir, "--remount-ro", "/", "--", os.path.realpath(exe)]
    return cmd
