"""Data stage: scan BreakHis, build the synthetic replica, split by patient, build datasets."""
