"""One process at a time uses a run folder: an OS lock held for the whole run, gone with the
process (SIGKILL included), a second user refused with the holder's pid and host; the other ranks
of a multi-process launch wait for their own rank 0 instead of locking."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli_runs import REPO, cli_env, run_cli, run_info

from breakhis_ft.run.ownership import (
    LOCK_FILE,
    RunFolderError,
    holding_run_folder,
    holds_run_folder,
    lock_run_folder,
    read_holder,
    release_run_folder,
    stamp_run_folder,
    wait_for_launch_holder,
)

HOLD = (
    "import sys; from breakhis_ft.run.ownership import lock_run_folder; "
    "lock_run_folder(sys.argv[1], ['holder']); print('held', flush=True); sys.stdin.read()"
)


def hold_in_another_process(folder: Path, cache: Path) -> subprocess.Popen:
    """A live process holding the folder's lock (until killed or its stdin closes)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        cwd=REPO,
        env=cli_env(cache),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


def test_resume_of_a_folder_in_use_is_refused_and_works_once_its_holder_is_killed(
    first_run, tmp_path: Path
) -> None:
    run_dir, cache = first_run
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("wandb"))
    holder = hold_in_another_process(folder, cache)
    try:
        before = snapshot(folder)
        args = [f"resume={folder}", "train=false", "test=false", "logger.mode=disabled"]
        done = run_cli(args, cache, timeout=120)
        assert done.returncode == 2, done.stderr[-3000:]
        assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in done.stderr
        assert snapshot(folder) == before  # not a line of log, no history entry
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops its lock
        holder.wait()
    done = run_cli(args, cache, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [h["from_step"] for h in run_info(folder)["history"]] == [4]
    assert read_holder(folder)["pid"] != holder.pid  # the resume held it in its turn


def test_the_lock_is_held_once_per_process_and_released(tmp_path: Path) -> None:
    stamp_run_folder(tmp_path)
    with holding_run_folder(tmp_path, ["a"]):
        assert holds_run_folder(tmp_path)
        with holding_run_folder(tmp_path):  # the entrypoint took it already: kept, not retaken
            pass
        assert holds_run_folder(tmp_path)
        assert read_holder(tmp_path) | {"since": None} == {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": None,
            "launch": None,
            "command": ["a"],
        }
    assert not holds_run_folder(tmp_path)
    lock_run_folder(tmp_path)  # free again
    release_run_folder(tmp_path)


def _launch(monkeypatch: pytest.MonkeyPatch, rank: int, port: str) -> None:
    for key, value in {
        "WORLD_SIZE": "2",
        "RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "TORCHELASTIC_RUN_ID": "none",
    }.items():
        monkeypatch.setenv(key, value)


def test_other_ranks_wait_for_their_own_rank_0(tmp_path: Path, monkeypatch) -> None:
    """Rank 1 goes on once rank 0 of its launch holds the folder; it never takes the lock itself
    (that would deadlock against its rank 0), and a folder held by another launch, or by nobody,
    is refused after the wait."""
    stamp_run_folder(tmp_path)
    _launch(monkeypatch, 1, "29500")
    with pytest.raises(RunFolderError, match="rank 1 waited"):  # rank 0 has not taken it
        wait_for_launch_holder(tmp_path, timeout_s=0.3)
    _launch(monkeypatch, 0, "29500")
    lock_run_folder(tmp_path)
    try:
        _launch(monkeypatch, 1, "29500")
        # returns at once, while rank 0's exclusive lock stands: had it tried to lock too, it
        # would wait for rank 0 to end (the deadlock of a multi-process launch)
        wait_for_launch_holder(tmp_path, timeout_s=5)
        _launch(monkeypatch, 1, "29501")  # a second launch on a folder the first one uses
        with pytest.raises(RunFolderError, match="held by pid"):
            wait_for_launch_holder(tmp_path, timeout_s=0.3)
    finally:
        release_run_folder(tmp_path)
    assert (tmp_path / LOCK_FILE).is_file()
