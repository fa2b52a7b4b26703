"""The statistics of a tiny run through the entrypoint: metrics.json, calibration.json, W&B."""

from __future__ import annotations

import json

from helpers.cli_runs import read_metrics


def test_final_metrics_hold_intervals_calibration_and_patient_level(first_run) -> None:
    run_dir, _ = first_run
    metrics = read_metrics(run_dir)
    calibration = json.loads((run_dir / "calibration.json").read_text())
    assert calibration == json.loads((run_dir / "best" / "calibration.json").read_text())
    temperature = calibration["temperature"]
    assert calibration["fitted_on"] == "val" and temperature > 0
    for split in ("val", "test"):
        m = metrics[split]
        for name in ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "auroc_macro"):
            lo, hi = m[f"{name}_ci95"]
            assert 0.0 <= lo <= hi <= 1.0, (split, name)
        assert len(m["patient_recognition_rate_ci95"]) == 2
        assert {"accuracy_ci95", "f1_ci95", "auroc_ci95"} <= set(m["binary"])
        # the default split groups sibling slides by stem: the intervals resample stems
        scheme = m["interval"]
        assert (scheme["method"], scheme["unit"], scheme["stratified_by"]) == (
            "percentile bootstrap",
            "stem",
            "class",
        )
        assert scheme["resamples"] == 1000 and scheme["level"] == 0.95
        cal = m["calibration"]
        assert set(cal["before"]) == {"ece", "mce", "brier", "nll"} and cal["n_bins"] == 15
        assert cal["temperature"] == temperature and set(cal["after"]) == set(cal["before"])
        patient = m["patient_level"]
        assert patient["fusion"] == "mean_log_prob"
        assert patient["n_patients"] == len(patient["diagnoses"])
        assert patient["interval"]["n_groups"] == scheme["n_groups"] <= patient["n_patients"]
        assert (
            len(patient["accuracy_ci95"]) == len(patient["binary"]["balanced_accuracy_ci95"]) == 2
        )
        assert sum(map(sum, patient["confusion_matrix"])) == patient["n_patients"]
        assert (run_dir / f"reliability_{split}.png").stat().st_size > 1000
    # fitted on val: the validation NLL cannot rise (T=1 was a candidate)
    val = metrics["val"]["calibration"]
    assert val["after"]["nll"] <= val["before"]["nll"] + 1e-9


def test_wandb_summary_holds_the_statistics_and_reliability_plots(first_run) -> None:
    run_dir, _ = first_run
    from helpers.wandb_records import run_summary

    (offline,) = run_dir.glob("wandb/offline-run-*")
    log = next(offline.glob("run-*.wandb")).read_bytes()
    assert b"plots/reliability_test" in log
    # the headline's intervals in the summary; the rest in each split's statistics table
    summary = run_summary(offline)["summary"]
    test = read_metrics(run_dir)["test"]
    assert summary["test/balanced_accuracy_ci95"] == test["balanced_accuracy_ci95"]
    table = json.loads((offline / "files" / summary["test/statistics"]["path"]).read_text())
    assert table["columns"] == ["scope", "metric", "value", "ci_low", "ci_high"]
    rows = {(r[0], r[1]): r[2:] for r in table["data"]}
    patient = test["patient_level"]
    assert rows["patient_level", "balanced_accuracy"] == [
        patient["balanced_accuracy"],
        *patient["balanced_accuracy_ci95"],
    ]
    assert rows["calibration/after", "ece"][0] == test["calibration"]["after"]["ece"]
    assert rows["patient_level/binary", "auroc"][0] == patient["binary"]["auroc"]
