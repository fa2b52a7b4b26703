"""Seconds from SIGTERM to exit of a training run, before and after the bounded stop, side by side.

    python -m benchmarks sigterm                  # 3 runs a side, the CPU demo with accumulation
    python -m benchmarks sigterm --repeats 5 --before <commit>

Each run is the CPU demo (`experiment=demo`, tiny Gemma 3, fp32) with its micro-batch of 16 and
16 of them an update (gradient accumulation: an update is long, as on MedGemma 4B), `logger=none`.
Once its first update is logged (metrics.jsonl), the run is sent SIGTERM `--delay` micro-batches
later (default 2.5, timed by that update's images/s): in the middle of a micro-batch, early in
the second update's accumulation. Timed: from
the signal to the process's exit (wall clock); from the signal to the recipe's "interrupted:
saving" log line (its timestamp: the stop itself, without the checkpoint's save and the process's
teardown); and what the run recorded (exit code, run_info.json's status and step).

"before" is the code of `--before` (default: main just before the bounded stop), extracted with
`git archive` into a temporary folder and run from there (its own conf/, its engine); "after" is
this working tree. Both use this virtual environment and one model/data cache, and run in turn
(before, after, before, ...) so the machine's load falls on both alike. The machine and its load
are recorded with the results (benchmarks/results/sigterm.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from benchmarks.stain_effect import machine

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# main before the bounded stop: the recipe finished the current optimizer update after SIGTERM
BEFORE = "033e6462361c8b535709c0c0e8ddb0d754b0634a"
BATCH, ACCUM = 16, 16
# the recipe's line as it starts the checkpoint of a stop (both versions), with Hydra's timestamp
SAVING = re.compile(
    r"\[([\d-]+ [\d:,]+)\]\[breakhis_ft\.engine\.recipe\]\[WARNING\] - interrupted: saving"
)
OVERRIDES = [
    "experiment=demo",
    "logger=none",
    f"trainer.batch_size={BATCH}",
    f"trainer.grad_accum={ACCUM}",
    "trainer.log_every_steps=1",
]


def extract(rev: str, into: Path) -> Path:
    """The tree of commit `rev` in `into`, with conf/ reachable as breakhis_ft.conf."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    # the editable install maps breakhis_ft.conf to this tree's conf/: the old code gets its own
    (into / "breakhis_ft" / "conf").symlink_to(into / "conf", target_is_directory=True)
    return into


def side_env(tree: Path, cache: Path) -> dict[str, str]:
    """The environment of a run from `tree` (PYTHONPATH puts its package first)."""
    env = {**os.environ, "BREAKHIS_FT_CACHE": str(cache), "WANDB_SILENT": "true"}
    env["PYTHONPATH"] = str(tree)
    return env


def check_imports(tree: Path, env: dict[str, str]) -> None:
    """Fail unless `python -m breakhis_ft` from `tree` imports its code and configs from there."""
    probe = (
        "import breakhis_ft.conf as c, breakhis_ft.engine.recipe as r; "
        "print(r.__file__, *c.__path__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tree, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    if not all(Path(p).resolve().is_relative_to(tree.resolve()) for p in out):
        raise RuntimeError(f"the code run from {tree} imports from elsewhere: {out}")


def first_update(run_dir: Path) -> dict[str, Any] | None:
    """The first logged training update of a run (metrics.jsonl), or None before it."""
    for path in run_dir.rglob("metrics.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if "train/loss" in record:
                return record
    return None


def saving_time(log: Path) -> float | None:
    """The time (epoch seconds) of the run's "interrupted: saving" line; None without one."""
    for line in log.read_text(errors="replace").splitlines():
        found = SAVING.search(line)
        if found:
            stamp = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()  # Hydra logs local time, as this process reads it
    return None


def stop_one(
    tree: Path, env: dict[str, str], run_dir: Path, delay: float, timeout: float
) -> dict[str, Any]:
    """One run from `tree`, SIGTERM `delay` micro-batches after its first update; seconds to exit
    and what it saved."""
    argv = [sys.executable, "-m", "breakhis_ft", *OVERRIDES, f"hydra.run.dir={run_dir}"]
    log = run_dir.with_suffix(".log")
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while (update := first_update(run_dir)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"no training update logged: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    micro_batch = BATCH / update["train/images_per_s"]
    time.sleep(delay * micro_batch)
    proc.send_signal(signal.SIGTERM)
    sent, sent_wall = time.monotonic(), time.time()
    code = proc.wait(timeout=timeout)
    seconds = time.monotonic() - sent
    saving = saving_time(log)
    info_file = next(run_dir.rglob("run_info.json"), None)
    info = json.loads(info_file.read_text()) if info_file else {}
    return {
        "seconds_to_exit": round(seconds, 3),
        "seconds_to_saving": None if saving is None else round(saving - sent_wall, 3),
        "exit_code": code,
        "status": info.get("status"),
        "checkpoint_step": info.get("step"),
        "micro_batch_seconds": round(micro_batch, 3),
        "signal_delay_seconds": round(delay * micro_batch, 3),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max seconds to exit and the median micro-batch time of one side."""
    seconds = [r["seconds_to_exit"] for r in runs]
    saving = [r["seconds_to_saving"] for r in runs if r["seconds_to_saving"] is not None]
    return {
        "median_s": round(statistics.median(seconds), 3),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "median_to_saving_s": round(statistics.median(saving), 3) if saving else None,
        "micro_batch_s": round(statistics.median(r["micro_batch_seconds"] for r in runs), 3),
    }


def table(result: dict[str, Any]) -> str:
    """The side-by-side table."""
    lines = [
        f"SIGTERM -> exit, {result['setting']} ({result['repeats']} runs a side)",
        f"{'code':<8}{'median s':>10}{'min s':>8}{'max s':>8}{'to saving s':>13}"
        f"{'micro-batch s':>15}  exit/status@checkpoint step",
    ]
    for side in ("before", "after"):
        s, runs = result[side]["summary"], result[side]["runs"]
        ends = ", ".join(f"{r['exit_code']}/{r['status']}@{r['checkpoint_step']}" for r in runs)
        saving = s["median_to_saving_s"]
        lines.append(
            f"{side:<8}{s['median_s']:>10.2f}{s['min_s']:>8.2f}{s['max_s']:>8.2f}"
            f"{'-' if saving is None else f'{saving:.2f}':>13}{s['micro_batch_s']:>15.2f}  {ends}"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """sigterm.md: the table the manual includes, with its setting and machine."""
    host = result["machine"]
    rows = [
        "| code | SIGTERM to exit, s (median, min-max) | SIGTERM to the checkpoint's start, s "
        "(median) | micro-batch, s | exit / status @ checkpoint step |",
        "|---|---|---|---|---|",
    ]
    for side in ("before", "after"):
        s, runs = result[side]["summary"], result[side]["runs"]
        ends = ", ".join(f"{r['exit_code']}/{r['status']}@{r['checkpoint_step']}" for r in runs)
        saving = "-" if s["median_to_saving_s"] is None else f"{s['median_to_saving_s']:.2f}"
        commit = result[side]["commit"][:10]
        rows.append(
            f"| {side} ({commit}) | {s['median_s']:.2f} ({s['min_s']:.2f}-{s['max_s']:.2f}) "
            f"| {saving} | {s['micro_batch_s']:.2f} | {ends} |"
        )
    load = ", ".join(f"{x:.1f}" for x in host["load_average_at_start"])
    rows += [
        "",
        f"{result['setting']}, {result['repeats']} runs a side, in turn; signal "
        f"{result['signal_sent']}. Measured {result['date']} on {host['cpu']} "
        f"({host['cpus']} cores), load average {load} at the start, torch {host['torch']}.",
    ]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run both sides in turn; print the table, write sigterm.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs a side")
    parser.add_argument("--before", default=BEFORE, help="the commit measured as 'before'")
    parser.add_argument(
        "--delay", type=float, default=2.5, help="micro-batches from the first update to SIGTERM"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds a run may take")
    parser.add_argument("--out", type=Path, default=RESULTS / "sigterm.json")
    args = parser.parse_args(argv)
    host = machine()
    with tempfile.TemporaryDirectory(prefix="sigterm-bench-") as tmp:
        tmp_path = Path(tmp)
        cache = tmp_path / "cache"
        trees = {"before": extract(args.before, tmp_path / "before"), "after": REPO}
        envs = {side: side_env(tree, cache) for side, tree in trees.items()}
        check_imports(trees["before"], envs["before"])
        runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        for i in range(args.repeats):
            for side in ("before", "after"):
                run_dir = tmp_path / f"{side}_{i}"
                runs[side].append(
                    stop_one(trees[side], envs[side], run_dir, args.delay, args.timeout)
                )
                print(side, i, runs[side][-1], flush=True)
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "setting": f"CPU demo, micro-batch {BATCH} x {ACCUM} accumulation",
        "overrides": OVERRIDES,
        "signal_sent": f"{args.delay} micro-batches after the first logged update",
        "repeats": args.repeats,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "before": {"commit": args.before, "runs": runs["before"]},
        "after": {"commit": f"{head} (working tree)", "runs": runs["after"]},
        "machine": {
            **host,
            "load_average_at_end": os.getloadavg(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
    }
    for side in ("before", "after"):
        result[side]["summary"] = summary(runs[side])
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
