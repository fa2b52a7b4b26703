"""Which folders a run may write, and which process uses a run folder now.

A run folder is breakhis-ft's when it holds `run_stamp.json`. The stamp goes into a folder that was
new or empty, before anything else: by the entrypoint before Hydra writes into a folder given as
`hydra.run.dir` (or made by `rerun=`), and as the job's first act in a folder Hydra has just made
from the time of day. `run_info.json` or `.hydra/` alone prove nothing: any program writes such
files. A folder that is neither new, empty nor stamped is refused before anything is written to it.

While a process uses a run folder it holds an OS lock (flock) on `run.lock` in it, which records
the holder's pid, host and start time. The kernel drops the lock with the process, even on
SIGKILL, so a killed run can be resumed at once, while a second process (`resume=` of a running
run, or a second user of the folder) is refused with the holder named. In a multi-process launch
(torchrun, accelerate) rank 0 takes the lock; the other ranks never lock, they wait until rank 0
of their own launch holds it (so they never write into a folder rank 0 refused, and never
deadlock on the lock their rank 0 holds). flock works on local file systems and on NFSv4.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from breakhis_ft.files import write_text_whole
from breakhis_ft.run.run_folder import now_iso

STAMP_FILE = "run_stamp.json"
LOCK_FILE = "run.lock"
RUN_INFO = "run_info.json"
_held: dict[Path, IO[str]] = {}  # run folders this process holds the lock of


class RunFolderError(ValueError):
    """A folder a run may not write or use now; the message names it and what to do instead."""


def is_run_folder(path: str | Path) -> bool:
    """Whether `path` carries breakhis-ft's run stamp."""
    try:
        stamp = json.loads((Path(path) / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("created_by") == "breakhis-ft"


def stamp_run_folder(path: str | Path) -> None:
    """Create `path` (when missing) and stamp it as a run folder of breakhis-ft."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not is_run_folder(path):
        stamp = {"created_by": "breakhis-ft", "created": now_iso(), "host": socket.gethostname()}
        # whole or absent: tasks of an array job stamp their shared sweep folder at once
        write_text_whole(path / STAMP_FILE, json.dumps(stamp, indent=2))


def _some_entries(path: Path, names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_new_run_folder(path: str | Path) -> None:
    """A folder given for a new run: new, empty, or a stamped folder in which no run started."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise RunFolderError(f"hydra.run.dir={path} is a file; give a new or empty folder")
    if is_run_folder(path):
        if (path / RUN_INFO).exists():
            raise RunFolderError(
                f"hydra.run.dir={path} already holds a run: continue it with resume={path}, "
                "or choose a new folder"
            )
        return  # stamped, but its run never started (e.g. a config error): reused
    entries = [p.name for p in path.iterdir()]
    if entries:
        raise RunFolderError(
            f"hydra.run.dir={path} holds files that breakhis-ft did not write "
            f"({_some_entries(path, entries)}; no {STAMP_FILE}): nothing was written to it. A run "
            "writes only into a new or empty folder: choose another hydra.run.dir, or leave it "
            "unset for a new folder under paths.output_dir"
        )


def check_resumable(path: str | Path) -> None:
    """`resume=` continues only a run folder breakhis-ft stamped."""
    path = Path(path)
    if not is_run_folder(path):
        raise RunFolderError(
            f"resume={path}: not a run folder of breakhis-ft (no {STAMP_FILE}); resume= "
            "continues only runs this project started, in their own folder. Start a new run "
            "instead (rerun=<folder> composes a breakhis-ft run's saved config into a new folder)"
        )


def claim_run_folder(path: str | Path, resuming: bool, command: list[str] | None = None) -> None:
    """For a folder given before Hydra runs (hydra.run.dir, resume=, rerun=): check it, stamp a
    new one, and take its lock for this process."""
    path = Path(path)
    if resuming:
        check_resumable(path)
    else:
        check_new_run_folder(path)
        stamp_run_folder(path)
    lock_run_folder(path, command)
    if not resuming:
        try:
            check_new_run_folder(path)  # again under the lock: a run may have started meanwhile
        except RunFolderError:
            release_run_folder(path)
            raise


def claim_job_folder(path: str | Path, hydra_files: set[str]) -> None:
    """Stamp the folder Hydra made for this job (it holds only `hydra_files` so far), or refuse
    a folder that held something else before the job began."""
    path = Path(path)
    if not is_run_folder(path):
        other = [p.name for p in path.iterdir() if p.name not in hydra_files | {LOCK_FILE}]
        if other:
            raise RunFolderError(
                f"the run folder {path} held files that breakhis-ft did not write "
                f"({_some_entries(path, other)}): the run stops before writing more. Choose a "
                "new folder (hydra.run.dir) or leave it to paths.output_dir"
            )
        stamp_run_folder(path)


def discard_unstarted_run(path: str | Path, hydra_files: set[str], remove_folder: bool) -> bool:
    """Take back what was written into a run folder whose run never started (its config was
    refused): the stamp, the lock (released) and Hydra's files (`hydra_files`: its log and its
    saved-config folder, whose three YAML files alone are removed), then the folder itself when
    `remove_folder` (this command made it) and it is empty. A folder that holds anything else, or
    a run_info.json (a run began there), is left as it is. Returns whether anything was removed."""
    path = Path(path)
    if not is_run_folder(path) or (path / RUN_INFO).exists():
        return False
    ours = {STAMP_FILE, LOCK_FILE} | hydra_files
    entries = list(path.iterdir())
    saved = [p for p in entries if p.is_dir()]
    if any(p.name not in ours or p.is_symlink() for p in entries) or any(
        not {q.name for q in d.iterdir()} <= {"config.yaml", "hydra.yaml", "overrides.yaml"}
        for d in saved
    ):
        return False
    release_run_folder(path)
    for folder in saved:
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    for file in entries:
        if file not in saved:
            file.unlink(missing_ok=True)
    if remove_folder:
        path.rmdir()
    return True


def launch_id() -> str | None:
    """What the processes of one multi-process launch share (None for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    keys = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")
    return "/".join(os.environ.get(k, "") for k in keys)


def read_holder(path: str | Path) -> dict[str, Any]:
    """What run.lock records of the process that holds (or last held) the folder's lock."""
    try:
        holder = json.loads((Path(path) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_text(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (it has not written its pid yet)"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')}; "
        f"command: {' '.join(map(str, holder.get('command') or []))})"
    )


def lock_run_folder(path: str | Path, command: list[str] | None = None) -> None:
    """Take the folder's lock for this process (held until `release_run_folder` or exit); a folder
    another process holds is refused with that process named."""
    path = Path(path).resolve()
    if path in _held:
        return
    lock = open(path / LOCK_FILE, "a+")  # noqa: SIM115 - open while the run uses the folder
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RunFolderError(
            f"{path} is in use by {_holder_text(read_holder(path))}: one process at a time uses "
            "a run folder. Wait until that run ends (or stop it) and try again"
        ) from None
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": now_iso(),
        "launch": launch_id(),
        "command": command or [],
    }
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps(holder))
    lock.flush()
    _held[path] = lock


def release_run_folder(path: str | Path) -> None:
    """Give up this process's lock on the folder (no-op when it holds none)."""
    lock = _held.pop(Path(path).resolve(), None)
    if lock is not None:
        lock.close()  # closing the file drops the flock


def holds_run_folder(path: str | Path) -> bool:
    """Whether this process holds the folder's lock."""
    return Path(path).resolve() in _held


@contextmanager
def holding_run_folder(path: str | Path, command: list[str] | None = None) -> Iterator[None]:
    """Hold the folder's lock within the block; a lock this process held before is kept after."""
    held_before = holds_run_folder(path)
    lock_run_folder(path, command)
    try:
        yield
    finally:
        if not held_before:
            release_run_folder(path)


def is_held(path: str | Path) -> bool:
    """Whether a live process holds the folder's lock (seen from this machine: on a local file
    system or NFSv4 any holder; on a bucket mount such as gcsfuse only this machine's)."""
    path = Path(path)
    try:
        with open(path / LOCK_FILE) as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False  # nobody holds it (closing the file drops our shared lock)
    except FileNotFoundError:
        return False


def wait_for_launch_holder(path: str | Path, timeout_s: float = 120.0) -> None:
    """On a rank > 0: wait until rank 0 of this launch holds the folder's lock (it has checked
    the folder and stamped it); refuse after `timeout_s`."""
    path, mine = Path(path), launch_id()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_held(path) and read_holder(path).get("launch") == mine:
            return
        time.sleep(0.1)
    raise RunFolderError(
        f"{path}: rank {os.environ.get('RANK')} waited {timeout_s:.0f} s for rank 0 of its "
        f"launch to take the run folder; it is held by {_holder_text(read_holder(path))}"
    )
