"""Run the toy training in its own process (for the SIGKILL/resume and 2-process tests).

    python tests/engine_driver.py RUN_DIR [--resume] [--kill-at N] [--grad-accum K] ...
    torchrun --standalone --nproc_per_node 2 tests/engine_driver.py RUN_DIR

Writes (main process only) final.safetensors, metrics.json, predictions_test.csv and result.json;
the tracking callback appends to log_rank<rank>.jsonl, so a non-main rank that logs would show up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from helpers.engine_toy import (  # tests/ is on the path when run as a script and under pytest
    ToyClassifier,
    ToyDataset,
    fit,
    make_accelerator,
    trainer_config,
)
from safetensors.torch import save_file

from breakhis_ft.engine.predict import predict
from breakhis_ft.evaluate.metrics import (
    compute_metrics,
    malignant_flags,
    write_predictions,
)


def main(argv: list[str] | None = None) -> None:
    """Train the toy classifier as the command line says; see the module docstring."""
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int, default=None, help="SIGKILL at this loss call")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # same arithmetic in every run, whatever the machine's load

    cfg = trainer_config(
        epochs=args.epochs, grad_accum=args.grad_accum, checkpoint_every_steps=args.checkpoint_every
    )
    acc = make_accelerator(cfg, "fp32")
    run_dir = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    def log_fn(metrics: dict[str, float], step: int) -> None:
        with (run_dir / f"log_rank{acc.process_index}.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    clf = ToyClassifier()
    clf.kill_at = args.kill_at
    result = fit(
        clf, ToyDataset(n=32), ToyDataset(n=16, seed=1), cfg, run_dir, acc, log_fn, args.resume
    )
    # 21 test images: not a multiple of 2 processes x batch 8, so shards are padded
    test = ToyDataset(n=21, seed=2)
    probs, labels, indices = predict(clf, test, acc, batch_size=8)
    weight_sum = acc.gather(torch.stack([p.double().sum() for p in clf.parameters()]).sum()[None])
    if acc.is_main_process:
        rows = [test.records[i] for i in indices.tolist()]
        patients = [r["patient"] for r in rows]
        mags = [r["magnification"] for r in rows]
        names = list(clf.class_names)
        metrics = compute_metrics(probs, labels, names, patients, mags, malignant_flags(names))
        (run_dir / "metrics.json").write_text(json.dumps({"test": metrics}, indent=1))
        write_predictions(run_dir / "predictions_test.csv", rows, probs, probs.argmax(1), names)
        save_file(clf.trainable_state_dict(), str(run_dir / "final.safetensors"))
        summary = {
            "global_step": result.global_step,
            "best_step": result.best_step,
            "best_value": result.best_value,
            "history": result.history,
            "num_processes": acc.num_processes,
            "weight_sums": weight_sum.tolist(),
        }
        (run_dir / "result.json").write_text(json.dumps(summary, indent=1))
    acc.wait_for_everyone()  # without it gloo ranks sometimes abort at exit
    acc.end_training()


if __name__ == "__main__":
    main()
