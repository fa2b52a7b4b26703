"""Files the project writes and reads back: checksum manifests, and builds under a lock.

A manifest lists the sha256 of files the project wrote (a checkpoint, `best/`, a cache shard), in
the format `sha256sum -c` reads. It is written last, atomically, once every file it lists is on
disk, and checked when they are read back: a truncated or garbled file is named instead of loaded.

A build of a shared folder (the replica, a tiny checkpoint, an image-cache shard) runs under an
OS file lock beside its target. The lock disappears with its process, even one killed by SIGKILL,
so the next builder knows that temporaries (`.tmp-<target>-*`) it finds under the lock belong to
a build that died and removes them, while it waits for a live concurrent builder instead.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "SHA256SUMS"  # a folder's manifest; a single file's is `<file>.sha256` beside it
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(directory: str | Path) -> None:
    """Flush a folder's entries (new names, renames) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(manifest: str | Path, files: Iterable[str | Path]) -> Path:
    """Write `manifest` (atomically, fsynced) with the sha256 of `files`, named relative to its
    folder; the files must be complete on disk already."""
    manifest = Path(manifest)
    base = manifest.parent
    lines = []
    for file in sorted(Path(f) for f in files):
        name = (file if file.is_absolute() else base / file).relative_to(base).as_posix()
        lines.append(f"{sha256_file(base / name)}  {name}\n")
    tmp = manifest.with_name(f".tmp-{manifest.name}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, manifest)
    fsync_dir(base)
    return manifest


def write_folder_manifest(folder: str | Path) -> Path:
    """Write `folder/SHA256SUMS` listing every file below `folder` (written last)."""
    folder = Path(folder)
    # named relative to `folder` (rglob of a relative folder gives paths relative to the cwd)
    files = [p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST]
    return write_manifest(folder / MANIFEST, files)


def file_manifest(path: str | Path) -> Path:
    """Where the manifest of one file is kept: `<file>.sha256` beside it."""
    path = Path(path)
    return path.with_name(f"{path.name}.sha256")


def manifest_problem(manifest: str | Path) -> str | None:
    """What is wrong with the files a manifest lists (missing, or another sha256), naming the
    first damaged file; None when every file matches."""
    manifest = Path(manifest)
    try:
        text = manifest.read_text()
    except OSError as err:
        return f"{manifest}: no readable checksum manifest ({err.strerror or err})"
    entries = [line.split("  ", 1) for line in text.splitlines() if line.strip()]
    if not entries or any(len(e) != 2 or len(e[0]) != 64 for e in entries):
        return f"{manifest}: not a sha256 manifest (damaged)"
    for expected, name in entries:
        path = manifest.parent / name
        try:
            actual = sha256_file(path)
        except OSError as err:
            return f"{path}: missing or unreadable ({err.strerror or err})"
        if actual != expected:
            return (
                f"{path}: damaged (sha256 {actual[:12]}... differs from {expected[:12]}... "
                f"recorded in {manifest.name} when it was written)"
            )
    return None


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree, whichever it is (gone already: nothing to do)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temp_beside(target: str | Path) -> Path:
    """A fresh temporary name for building `target`: `.tmp-<name>-<random>` in its folder."""
    target = Path(target)
    return target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")


def write_text_whole(path: str | Path, text: str) -> None:
    """Write a file whole: a fresh temporary beside it, renamed over it, so processes that write
    the same file at once, and readers, never see part of one."""
    path = Path(path)
    tmp = temp_beside(path)
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def build_lock(target: str | Path) -> Iterator[None]:
    """Hold the exclusive build lock of `target` while the block runs.

    The lock is `.<name>.lock` beside `target` (an flock, released when the process ends, however
    it ends). A second builder waits for the first. Under the lock, every `.tmp-<name>-*` beside
    the target is a leftover of a build that died (builders make them only while holding it) and
    is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            log.info("waiting for %s, which is building %s", holder, target)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        _remove_temporaries(target)
        try:
            yield
        finally:
            lock.truncate(0)  # the lock itself is released when the file closes


def _remove_temporaries(target: Path) -> None:
    for stale in target.parent.glob(f".tmp-{glob.escape(target.name)}-*"):
        log.info("removing %s, left by a build that did not finish", stale)
        remove_path(stale)


def remove_dead_builds(target: str | Path) -> None:
    """Remove the temporaries of dead builds of `target` now if no build of it is running (its
    lock is free); a live builder's are left alone."""
    target = Path(target)
    lock_path = target.with_name(f".{target.name}.lock")
    if not lock_path.is_file():
        return
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        _remove_temporaries(target)


def build_once(
    target: str | Path, build: Callable[[Path], Any], is_built: Callable[[Path], bool]
) -> Path:
    """`target`, built once: unless `is_built(target)`, `build(folder)` fills a fresh temporary
    folder that is then renamed into place, under `target`'s build lock (a concurrent builder
    waits, then finds it built; temporaries of dead builds are removed). A `target` that exists
    unbuilt (unfinished, or of an older recipe) is replaced: the caller makes sure it is ours."""
    target = Path(target)
    if is_built(target):
        return target
    with build_lock(target):
        if is_built(target):  # built by another process while this one waited
            return target
        tmp = temp_beside(target)
        tmp.mkdir()
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        finally:
            remove_path(tmp)
    return target
