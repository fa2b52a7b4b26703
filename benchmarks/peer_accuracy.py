"""The peer benchmark's accuracy: time to accuracy and non-inferiority, notebook vs breakhis-ft.

Both paths (the seed blog's trl recipe, benchmarks/notebook.py, and the project's default path,
benchmarks/project.py) train `--peer-epochs` epochs on the same images from each seed of
`--peer-seeds` (the seed draws the LoRA initialisation and the data order; the split stays). After
every epoch, outside its clock, the validation split is scored two ways on both paths: *label
scoring* (each class's answer scored by `MedGemmaClassifier.predict_proba` on the path's own
prompt, argmax) and *generation* (greedy, parsed by the path's own parser: the blog's regex, the
project's `model.prompt.parse`; an unparsed answer is wrong).

Time to accuracy, as MLPerf and DAWNBench report it: the training seconds (the one-off
preparation, then whole epochs; evaluation not counted) up to the end of the first epoch whose
validation balanced accuracy reaches `--peer-target`, a figure stated before the run.

After the last epoch each path scores the test split both ways and writes its per-image
predictions (the project's predictions format; generation as one-hot rows with an `unparseable`
column). The project's paired patient bootstrap, `compare_runs` (behind `breakhis-ft-report
--compare`), gives the interval of breakhis-ft - notebook per seed, and over the seeds pooled: the
seeds share the test images, so their predictions are stacked (each image once per seed, its
patient unchanged) and a resample draws a patient with its images in every seed, keeping the
pairing across seeds; the balanced accuracy of the stack is the mean of the seeds' (every class
has the same images in each seed). Non-inferiority holds where the interval's lower bound lies
above `--peer-margin`.
"""

from __future__ import annotations

import csv
import gc
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from benchmarks import notebook as nb
from benchmarks import project as bp
from breakhis_ft.analysis.comparison import compare_runs
from breakhis_ft.config import PromptConfig
from breakhis_ft.data.breakhis import BreakhisScan
from breakhis_ft.data.dataset import labels_for
from breakhis_ft.data.records import ImageRecord, class_names
from breakhis_ft.engine.predict import predict
from breakhis_ft.evaluate.bootstrap import balanced_accuracy
from breakhis_ft.evaluate.generation import UNPARSEABLE, generate_split
from breakhis_ft.evaluate.metrics import write_predictions
from breakhis_ft.models.medgemma import MedGemmaClassifier
from breakhis_ft.models.prompts import make_prompt

PATHS = ("notebook", "breakhis-ft")
SCORERS = ("label", "generation")
CLASSES = class_names("subtype8")
EVAL_BATCH = 16  # the notebook's batch_predict batch


def blog_prompt():
    """The project's ClassPrompt equal to the notebook's prompt (for label scoring its model)."""
    prompt = make_prompt(PromptConfig(class_names="blog"), CLASSES)
    if prompt.user_text() != nb.BLOG_PROMPT:
        raise RuntimeError("make_prompt(class_names=blog) no longer gives the notebook's prompt")
    return prompt


def one_hot(preds: list[int]) -> np.ndarray:
    """Generated answers as probability rows over the classes + `unparseable` (-1)."""
    hard = np.where(np.asarray(preds) < 0, len(CLASSES), np.asarray(preds))
    return np.eye(len(CLASSES) + 1)[hard]


def scored(probs: np.ndarray, labels: list[int], seconds: float) -> dict[str, Any]:
    """Balanced accuracy (the project's definition), seconds and unparsed answers of a scoring."""
    return {
        "balanced_accuracy": balanced_accuracy(probs, np.asarray(labels)),
        "seconds": seconds,
        "images_per_s": len(labels) / seconds,
        "unparsed": int((probs.argmax(axis=1) == len(CLASSES)).sum()),
        "probs": probs,
    }


def notebook_scores(model, processor, eval_ds, labels: list[int]) -> dict[str, dict]:
    """The notebook's model scored both ways on a `notebook_dataset` (images decoded each time)."""
    was_training = model.training
    model.eval()
    clf = MedGemmaClassifier(model, processor, blog_prompt())
    start = time.perf_counter()
    with torch.no_grad():
        rows = [{**eval_ds[i], "index": i} for i in range(len(eval_ds))]
        probs = [
            clf.predict_proba(clf.collate(rows[i : i + EVAL_BATCH], train=False))
            for i in range(0, len(rows), EVAL_BATCH)
        ]
    label = scored(torch.cat(probs).float().numpy(), labels, time.perf_counter() - start)
    preds, seconds, _ = nb.predict(model, processor, eval_ds, EVAL_BATCH)
    model.train(was_training)
    return {"label": label, "generation": scored(one_hot(preds), labels, seconds)}


def project_scores(run: dict[str, Any], split: str) -> dict[str, dict]:
    """The project's classifier scored both ways through its engine (label scoring from cached
    vision features where the path caches them; generation from the pixels)."""
    clf, data, acc = run["classifier"], run["data"][split], run["accelerator"]
    labels = list(data.labels)
    start = time.perf_counter()
    probs, _, _ = predict(clf, data, acc, EVAL_BATCH)
    label = scored(probs.float().numpy(), labels, time.perf_counter() - start)
    start = time.perf_counter()
    answers = generate_split(clf, data, acc, EVAL_BATCH)
    generation = scored(one_hot(answers.preds.tolist()), labels, time.perf_counter() - start)
    return {"label": label, "generation": generation}


def curve_point(epoch: int, train_s: float, scores: dict[str, dict]) -> dict[str, Any]:
    """One evaluation of the validation curve (probabilities dropped)."""
    return {
        "epoch": epoch,
        "train_s": train_s,
        **{f"val_{k}": v["balanced_accuracy"] for k, v in scores.items()},
        **{f"val_{k}_unparsed": v["unparsed"] for k, v in scores.items()},
        "eval_s": sum(v["seconds"] for v in scores.values()),
    }


class EpochEvaluator(TrainerCallback):
    """Times each epoch of the notebook's Trainer and scores the validation split after it, off
    the clock."""

    def __init__(self, processor, val_ds, labels: list[int], one_off_s: float) -> None:
        self.processor, self.val_ds, self.labels = processor, val_ds, labels
        self.train_s, self.curve = one_off_s, []
        self._start = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        """Start the epoch's clock."""
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, model=None, **kwargs) -> None:
        """Stop the clock; evaluate the model as it is at the end of the epoch."""
        self.train_s += time.perf_counter() - self._start
        scores = notebook_scores(model, self.processor, self.val_ds, self.labels)
        self.curve.append(curve_point(len(self.curve) + 1, self.train_s, scores))


def _split_columns(scan: BreakhisScan, splits: dict) -> tuple[dict, dict]:
    """Per split: the image files and the class indices."""
    files = {k: [scan.root / r.path for r in recs] for k, recs in splits.items()}
    return files, {k: labels_for(recs, "subtype8") for k, recs in splits.items()}


def run_notebook(
    checkpoint: Path, work: Path, scan: BreakhisScan, splits: dict, epochs: int, seed: int
) -> dict:
    """The notebook's recipe from `seed`: its validation curve, then the merged model (as the
    blog evaluates) on the test split."""
    files, labels = _split_columns(scan, splits)
    start = time.perf_counter()
    train_ds = nb.notebook_dataset(files["train"], labels["train"])
    one_off = time.perf_counter() - start
    val_ds = nb.notebook_dataset(files["val"], labels["val"])
    test_ds = nb.notebook_dataset(files["test"], labels["test"])
    evaluator = EpochEvaluator(nb.load_processor(checkpoint), val_ds, labels["val"], one_off)
    trainer, processor, epoch_s = nb.train(
        checkpoint, train_ds, work / "trl_out", epochs, seed=seed, callbacks=[evaluator]
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    start = time.perf_counter()
    model = nb.merged_model(trainer)
    merge_s = time.perf_counter() - start
    test = notebook_scores(model, processor, test_ds, labels["test"])
    del trainer, model
    gc.collect()
    return {
        "one_off_s": one_off,
        "epoch_s": epoch_s,
        "curve": evaluator.curve,
        "test": test,
        "test_one_off_s": merge_s,
        "trainable_parameters": trainable,
    }


def run_project(
    checkpoint: Path,
    work: Path,
    scan: BreakhisScan,
    splits: dict,
    epochs: int,
    seed: int,
    image_size: int,
) -> dict:
    """breakhis-ft's default path from `seed`: its validation curve, then the test split."""
    curve: list[dict] = []
    eval_one_off = {"s": 0.0}

    def after_epoch(run: dict[str, Any], epoch: int) -> None:
        if epoch == 1:  # the evaluated images' vision features, once (a run computes them too)
            start = time.perf_counter()
            run["classifier"].prepare_cached_inputs(
                [run["data"]["val"], run["data"]["test"]], scan.root
            )
            eval_one_off["s"] = time.perf_counter() - start
        times = run["times"]
        one_off = times["image_cache_s"] + times["train_features_s"]
        train_s = one_off + sum(run["recipe"].epoch_seconds)
        curve.append(curve_point(epoch, train_s, project_scores(run, "val")))

    base = bp.base_settings(checkpoint, work / "cache", epochs, image_size)
    settings = {**base, **bp.DEFAULTS, "seed": str(seed)}
    run = bp.train_project(settings, scan, splits, work / "project_run", True, after_epoch)
    times = run["times"]
    test = project_scores(run, "test")
    out = {
        "one_off_s": times["image_cache_s"] + times["train_features_s"],
        "epoch_s": times["epoch_s"],
        "curve": curve,
        "test": test,
        "test_one_off_s": eval_one_off["s"],
        "trainable_parameters": run["classifier"].parameter_counts()[0],
    }
    del run
    gc.collect()
    return out


def time_to_accuracy(curve: list[dict], scorer: str, target: float) -> dict[str, Any] | None:
    """The first evaluation whose validation balanced accuracy (by `scorer`) reaches `target`:
    its epoch and the training seconds to its end; None when none does."""
    for point in curve:
        if point[f"val_{scorer}"] >= target:
            return {"epoch": point["epoch"], "seconds": point["train_s"]}
    return None


# what `report --compare` reads of a run's config: the split grouped sibling slides by stem (the
# benchmark's SplitConfig()), so its paired bootstrap resamples stems
SPLIT_GROUPING = "split:\n  group_by: stem\n"


def mark_stem_split(folder: Path) -> None:
    """Record in `folder/.hydra/config.yaml`, as a run does, that its split grouped by stem."""
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "config.yaml").write_text(SPLIT_GROUPING)


def write_test_predictions(folder: Path, records: list[ImageRecord], scores: dict) -> None:
    """Per scorer, `folder/<scorer>/predictions_test.csv` in the project's format, with the
    split's grouping (mark_stem_split)."""
    labels = labels_for(records, "subtype8")
    rows = [{**r.as_dict(), "label": y} for r, y in zip(records, labels, strict=True)]
    for scorer, result in scores.items():
        probs = torch.as_tensor(result["probs"])
        names = CLASSES if probs.shape[1] == len(CLASSES) else (*CLASSES, UNPARSEABLE)
        write_predictions(
            folder / scorer / "predictions_test.csv", rows, probs, probs.argmax(dim=1), names
        )
        mark_stem_split(folder / scorer)


def stack_seeds(folders: list[Path], out: Path) -> Path:
    """The seeds' predictions of one path and scorer stacked into `out/predictions_test.csv`,
    each image's path prefixed by its seed folder (its patient unchanged)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions_test.csv").open("w", newline="") as f:
        writer = None
        for folder in folders:
            with (folder / "predictions_test.csv").open(newline="") as g:
                reader = csv.DictReader(g)
                if writer is None:
                    writer = csv.DictWriter(f, fieldnames=reader.fieldnames)
                    writer.writeheader()
                for row in reader:
                    row["path"] = f"{folder.parent.name}/{row['path']}"
                    writer.writerow(row)
    mark_stem_split(out)
    return out


def predicted_classes(folder: Path) -> int:
    """How many distinct classes a path's `predictions_test.csv` predicts."""
    with (folder / "predictions_test.csv").open(newline="") as f:
        return len({row["pred"] for row in csv.DictReader(f)})


def verdict(result: dict[str, Any], margin: float, classes: dict[str, int]) -> dict[str, Any]:
    """breakhis-ft - notebook balanced accuracy, its paired interval and the non-inferiority
    verdict (the interval's lower bound above `margin`); `classes`: the distinct classes each
    path predicts. Where both predict one class on every image the verdict is vacuous: both sit
    at 1 / classes whatever they learned, and the interval is [0, 0]."""
    ba = result["metrics"]["balanced_accuracy"]
    lower = ba["ci95"][0] if ba["ci95"] else None
    return {
        "predicted_classes": classes,
        "vacuous": max(classes.values()) == 1,
        "breakhis_ft": ba["a"],
        "notebook": ba["b"],
        "difference": ba["difference"],
        "ci95": ba["ci95"],
        "non_inferior": lower is not None and lower > margin,
        "share_breakhis_ft_wins": ba["share_a_wins"],
        "images": result["n_images"],
        "patients": result["n_patients"],
        "interval": result["interval"],  # its method, resampled unit (stem) and groups
        "resamples": result["resamples"],
        "bootstrap_seed": result["seed"],
    }


def paired_comparisons(root: Path, seeds: list[int], margin: float, work: Path) -> dict:
    """Per scorer: breakhis-ft vs notebook on each seed's test predictions and on the seeds
    pooled, with the project's paired patient bootstrap (compare_runs)."""
    out: dict[str, Any] = {}
    for scorer in SCORERS:
        folders = {p: [root / p / f"seed{s}" / scorer for s in seeds] for p in PATHS}
        per_seed = {}
        for s, a, b in zip(seeds, folders["breakhis-ft"], folders["notebook"], strict=True):
            classes = {"breakhis-ft": predicted_classes(a), "notebook": predicted_classes(b)}
            per_seed[str(s)] = verdict(compare_runs(a, b), margin, classes)
        pooled = [stack_seeds(folders[p], work / "pooled" / p / scorer) for p in PATHS]
        classes = {p: predicted_classes(f) for p, f in zip(PATHS, pooled, strict=True)}
        out[scorer] = {
            "per_seed": per_seed,
            "pooled": verdict(compare_runs(*pooled[::-1]), margin, classes),
        }
    return out


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """A path's run without the probability arrays (written as predictions instead)."""
    test = {k: {m: v for m, v in s.items() if m != "probs"} for k, s in result["test"].items()}
    return {**result, "test": test}


def accuracy_section(
    checkpoint: Path, work: Path, scan: BreakhisScan, splits: dict, args, save
) -> dict[str, Any]:
    """Every path from every seed; time to accuracy, test scores, predictions and the paired
    comparisons. `save(section)` keeps what is done after each run (a long run cut short)."""
    root = args.out / "peer_predictions"
    section: dict[str, Any] = {
        "target_val_balanced_accuracy": args.peer_target,
        "non_inferiority_margin": args.peer_margin,
        "epochs": args.peer_epochs,
        "seeds": args.peer_seeds,
        "images": {k: len(v) for k, v in splits.items()},
        "patients": {k: len({r.patient for r in v}) for k, v in splits.items()},
        "runs": {p: {} for p in PATHS},
    }
    for seed in args.peer_seeds:  # paths alternate: a busy moment does not hit one side only
        for name in PATHS:
            if name == "notebook":
                result = run_notebook(checkpoint, work, scan, splits, args.peer_epochs, seed)
            else:
                result = run_project(
                    checkpoint, work, scan, splits, args.peer_epochs, seed, args.image_size
                )
            result["load_average_end"] = os.getloadavg()  # a shared machine's load (1, 5, 15 min)
            write_test_predictions(root / name / f"seed{seed}", splits["test"], result["test"])
            result["time_to_accuracy"] = {
                s: time_to_accuracy(result["curve"], s, args.peer_target) for s in SCORERS
            }
            section["runs"][name][str(seed)] = summarise(result)
            save(section)
    section["comparison"] = paired_comparisons(root, args.peer_seeds, args.peer_margin, work)
    return section
