"""Does the peer benchmark's stand-in learn, given more steps? The project's default path alone.

  python -m benchmarks peer-learning --peer-max-train 280 --peer-epochs 8   # writes
                                                                           # peer_learning.json

The same stand-in (pretrained, cached by `python -m benchmarks bench --only peer`), replica and
patient split as the peer benchmark, trained by breakhis-ft's default path only (the fast one) for
as many epochs as given, from one seed; after every epoch (off the clock) the validation split is
scored by label scoring and generation, and at the end the test split. It answers how many
optimizer steps the stand-in needs before its validation balanced accuracy leaves chance, which
sizes the peer benchmark's accuracy section (whose notebook path costs ~5x more per image).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks import peer
from benchmarks.peer_accuracy import run_project, summarise
from benchmarks.peer_report import add_peer_arguments
from breakhis_ft.data.breakhis import load_image


def main(argv: list[str] | None = None) -> int:
    """Train the default path on the peer stand-in; write peer_learning.json into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_work"))
    add_peer_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = args.work.resolve()  # checkpoints under a run folder named absolutely
    scan, splits = peer.replica_splits(work, args.peer_fraction, args)
    item = {"image": load_image(scan.root / splits["train"][0].path), "label": 0, "index": 0}
    checkpoint, sizes = peer.peer_checkpoint(work / "peer", work, item, args)
    start, load = time.perf_counter(), os.getloadavg()
    seed = args.peer_seeds[0]
    result = run_project(
        checkpoint, work / "peer", scan, splits, args.peer_epochs, seed, sizes["image_size"]
    )
    out = {
        "command": "python -m benchmarks peer-learning " + " ".join(argv or []),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, 1 thread",
        "load_average": {"start": load, "end": os.getloadavg()},
        "seconds": time.perf_counter() - start,
        "seed": seed,
        "images": {k: len(v) for k, v in splits.items()},
        "optimizer_steps_per_epoch": -(-len(splits["train"]) // 8),  # batch 8 x 1
        "breakhis-ft": summarise(result),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer_learning.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    for point in result["curve"]:
        print(point)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
