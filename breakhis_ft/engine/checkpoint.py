"""Checkpoints through accelerate's save_state/load_state: trainable weights only, atomic writes.

Layout of a run folder:

    run_dir/checkpoints/step_000120/   model.safetensors (trainable parameters only), optimizer.bin,
                                       scheduler.bin, random_states_<rank>.pkl, trainer_state.json,
                                       SHA256SUMS (written last: the sha256 of every file)
    run_dir/checkpoints/.tmp-step_...  a save in progress (ignored and cleaned up)
    run_dir/best/                      classifier.save_trained() of the best evaluation, SHA256SUMS
    run_dir/FAILED                     present when the run stopped on an error (non-finite loss)

A checkpoint is complete when its folder has its final name and holds `trainer_state.json`; both
happen only after every file is written and fsynced, so a crash while saving leaves the previous
checkpoint as the latest complete one. A checkpoint is checked against its SHA256SUMS before it is
resumed from: a truncated or garbled file (a disk error, a copy cut short) is named and that
checkpoint skipped for the newest one that verifies (`resumable_checkpoint`). `best/` is swapped
in by two renames; a crash between them leaves `.old-best` (the previous copy, whole), which
`recover_best` puts back at the next resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch.utils.hooks import RemovableHandle

from breakhis_ft.errors import CheckpointError
from breakhis_ft.files import MANIFEST, fsync_dir, manifest_problem, write_folder_manifest

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
FAILED_FILE = "FAILED"
WEIGHTS_FILE = "model.safetensors"  # accelerate's SAFE_WEIGHTS_NAME for the first model
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_tree(directory: Path) -> None:
    """Flush every file under `directory`, then the folders themselves, to disk."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint at optimizer step `step`."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder as (step, folder), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The latest complete checkpoint of a run folder, or None when it has none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


_VERIFIED: dict[Path, tuple[tuple, str | None]] = {}  # folder -> (its files' stat, problem)


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """What is damaged in a checkpoint (or `best/`) folder, naming the file; None when every file
    matches the SHA256SUMS written with it. A folder saved before checksums were recorded is not
    verified (a warning says so). Checked once per process while its files are unchanged."""
    folder = Path(checkpoint)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    signature = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    cached = _VERIFIED.get(folder)
    if cached is not None and cached[0] == signature:
        return cached[1]
    if not (folder / MANIFEST).is_file():
        log.warning("%s has no %s (saved by an earlier version): not verified", folder, MANIFEST)
        problem = None
    else:
        problem = manifest_problem(folder / MANIFEST)
    _VERIFIED[folder] = (signature, problem)
    return problem


def resumable_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint that verifies, as (step, folder); None when the run has no
    checkpoint. Damaged ones are skipped with a warning naming the file; when every checkpoint is
    damaged, CheckpointError says which and how to start again."""
    found = list_checkpoints(run_dir)
    problems = []
    for step, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                log.warning("resuming from %s instead (step %d)", path.name, step)
            return step, path
        log.warning("resume: skipping checkpoint %s: %s", path.name, problem)
        problems.append(problem)
    if problems:
        listed = "\n  ".join(problems)
        raise CheckpointError(
            f"resume: no checkpoint of {run_dir} verifies:\n  {listed}\nThe run cannot continue "
            f"from them; start it again as a new run, or move {Path(run_dir) / CHECKPOINTS} aside "
            "to train this run from step 0"
        )
    return None


def recover_best(best_dir: str | Path) -> Path | None:
    """Put back a `best/` that a crash left between its two renames; returns the folder restored.

    `.old-<name>` is the previous copy (whole: it was `best/`) and matches the state of the run's
    latest checkpoint, which was saved before that evaluation: it is preferred. Without it, a
    `.tmp-<name>` whose checksums verify (the first save) is used. Leftovers beside an existing
    `best/` are removed.
    """
    best = Path(best_dir)
    old, tmp = best.with_name(f".old-{best.name}"), best.with_name(f".tmp-{best.name}")
    restored = None
    if not best.exists():
        if old.is_dir():
            restored = old
        elif tmp.is_dir() and (tmp / MANIFEST).is_file() and checkpoint_problem(tmp) is None:
            restored = tmp
        if restored is not None:
            os.replace(restored, best)
            fsync_dir(best.parent)
            log.warning("recovered %s from %s (a save of it was interrupted)", best, restored.name)
    for leftover in (old, tmp):
        if leftover.exists():
            shutil.rmtree(leftover)
    return None if restored is None else best


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The trainer's own state (step, epoch, data position, best...) saved with a checkpoint."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def register_trainable_hooks(accelerator: Accelerator) -> list[RemovableHandle]:
    """Make save_state/load_state store only `trainable_state_dict()` of each prepared model.

    Each prepared model must unwrap to a module with a `classifier` attribute or be a Classifier
    itself. Under FSDP and DeepSpeed accelerate saves the (sharded) model its own way and these
    hooks leave it alone.
    """

    def classifier_of(model):
        inner = accelerator.unwrap_model(model)
        return getattr(inner, "classifier", inner)

    def save_hook(models, weights, _output_dir):
        # weights[i] is models[i].state_dict(): keep only what trains (an 8 GB model -> MBs of LoRA)
        for model, state in zip(models, weights, strict=False):
            trainable = classifier_of(model).trainable_state_dict()
            state.clear()
            state.update(trainable)

    def load_hook(models, input_dir):
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return
        for i, model in enumerate(models):
            name = WEIGHTS_FILE if i == 0 else WEIGHTS_FILE.replace(".", f"_{i}.")
            classifier_of(model).load_trainable_state_dict(load_file(os.path.join(input_dir, name)))
        models.clear()  # loaded here: accelerate must not load them again (strictly, in full)

    return [
        accelerator.register_save_state_pre_hook(save_hook),
        accelerator.register_load_state_pre_hook(load_hook),
    ]


class CheckpointManager:
    """Atomic save_state checkpoints of one run folder, pruned to the `keep` most recent."""

    def __init__(self, run_dir: str | Path, accelerator: Accelerator, keep: int = 2) -> None:
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.keep = keep

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Save the accelerator state at `step` with `trainer_state`; returns the final folder."""
        acc = self.accelerator
        final = checkpoint_dir(self.run_dir, step)
        tmp = final.with_name(f".tmp-{final.name}")
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)  # a save that crashed earlier
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every rank writes its own RNG file into the same folder
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
            write_folder_manifest(tmp)  # last: the sha256 of every file, checked on resume
            _fsync_tree(tmp)
            if final.exists():  # a re-run of this step (e.g. resumed twice): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            self.prune()
        acc.wait_for_everyone()
        return final

    def prune(self) -> None:
        """Delete all but the `keep` latest checkpoints (keep <= 0 keeps all) and stale temps."""
        root = self.run_dir / CHECKPOINTS
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.keep <= 0:
            return
        for _step, path in list_checkpoints(self.run_dir)[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, checkpoint: str | Path) -> dict[str, Any]:
        """Restore the accelerator state from a checkpoint; returns its trainer state."""
        state = read_trainer_state(checkpoint)
        self.accelerator.load_state(str(checkpoint))
        return state


def mark_failed(run_dir: str | Path, message: str) -> Path:
    """Mark a run folder failed: write `FAILED` with the reason (main process only)."""
    path = Path(run_dir) / FAILED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(message.rstrip() + "\n")
    return path


def save_trained_atomic(
    classifier: Any, directory: str | Path, extra_files: dict[str, str] | None = None
) -> Path:
    """`classifier.save_trained` (plus small text files) into a temp folder, then swap it in."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    old = directory.with_name(f".old-{directory.name}")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    classifier.save_trained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    write_folder_manifest(tmp)
    _fsync_tree(tmp)
    # two renames: the old copy stays whole until the new one has its final name
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory
