"""Files every part of the toolkit writes or reads back: atomic writes, checkpoints, JSON lines that survive a kill.

``append_jsonl`` writes complete lines and fsyncs, so a killed run loses at most the line being written;
``read_jsonl`` reads such a file back, ignoring (and with ``repair`` cutting off) a torn last line, and
names the file and line of anything else that is not a JSON object.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The objects of a JSON-lines file ([] when it does not exist).

    A torn last line (a run killed mid-write) is ignored with a warning, and cut off the file when
    ``repair`` so that appends start on a clean line. A bad line elsewhere, or a line that is valid JSON
    but not an object, is an error naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, keep = [], 0  # keep: bytes of the file that hold complete, valid lines
    for n, line in enumerate(lines):
        last = n == len(lines) - 1
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if not last:
                    raise ValueError(f"{path}: line {n + 1} is not valid JSON; fix or remove it "
                                     "(only a torn last line is repaired automatically)") from None
                log.warning("%s: ignoring a torn last line (%d bytes) left by an interrupted run", path, len(line))
                break
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {n + 1} is a JSON {type(rec).__name__}, not an object "
                                 "({\"key\": value, ...}); fix or remove that line")
            records.append(rec)
        keep += len(line) + (0 if last else 1)
    if repair and data and (keep != len(data) or not data.endswith(b"\n")):
        with open(path, "r+b") as f:
            f.truncate(keep)
            if keep and not data[:keep].endswith(b"\n"):
                f.seek(keep)
                f.write(b"\n")
            os.fsync(f.fileno())
    return records


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append complete lines and fsync, so a kill loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_writable(path: str | os.PathLike, flag: str, is_dir: bool = False) -> Path:
    """Fail now, before any expensive work, if ``path`` cannot be written later.

    A file path must not be a folder and its nearest existing parent must be a writable folder; a folder
    path must not be a file. Nothing is created.
    """
    p = Path(path).expanduser()
    if is_dir and p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder path")
    if not is_dir and p.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file path inside it, e.g. {p / 'out'}")
    parent = p if is_dir and p.exists() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {parent} is not writable; choose a path you can write to")
    return p


# ------------------------------------------------------------------------------------------- atomic IO
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp if is_dir else tmp / path.name
    try:
        yield target
        if is_dir:
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def publish_checkpoint(tmp: Path, root: Path, name: str, record: dict, prefix: str, keep: int) -> Path:
    """Move a fully written checkpoint folder ``tmp`` into place as ``root/name``, then point
    ``root/latest.json`` at it (a crash before that leaves the previous checkpoint the latest) and keep
    only the newest ``keep`` folders named ``prefix*`` (0: keep all)."""
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(root / "latest.json", {"name": name, **record})
    kept = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith(prefix))
    for old in (kept[:-keep] if keep else []):
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", final)
    return final


# ------------------------------------------------------------------------------------------ run folders
LOCK_NAME = ".lock"


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock`` holding this process's pid, so that two runs never write
    into one folder (their checkpoints and metrics lines would interleave). The lock goes with the process:
    a killed run leaves a stale file, never a held lock. :meth:`release` is idempotent."""

    def __init__(self, folder: str | os.PathLike, flag: str = "--output_dir"):
        import fcntl

        self.path = Path(folder) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.seek(0)
            holder = self._f.read().strip() or "unknown"
            self._f.close()
            raise ValueError(f"{flag} {folder} is in use by another run (pid {holder}, lock {self.path}): wait for "
                             f"it to finish (or stop it), or choose another {flag}") from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"{os.getpid()}\n")
        self._f.flush()

    def release(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()  # closing the file drops the flock


def remove_stale_tmp(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary siblings a killed run left in ``folder``: the ``.<name>.<random>.tmp`` of
    :func:`atomic_path` (any name, or only ``name``'s) and a checkpoint's ``.<name>.tmp``. Call it only while
    holding the folder's :class:`RunLock` (a live run's temporaries look the same)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{name}.*tmp" if name else ".*.tmp"
    gone = []
    for p in sorted(folder.glob(pattern)):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
        log.warning("removed %s, left unfinished by an interrupted run", p)
    return gone
