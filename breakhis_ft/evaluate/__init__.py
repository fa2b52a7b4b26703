"""Evaluation: metrics, intervals, calibration, patient-level diagnosis."""
