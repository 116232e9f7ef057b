"""Evaluation: metrics, calibration, distribution shifts, robustness, paired tests."""
