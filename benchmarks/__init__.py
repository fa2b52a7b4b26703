"""The project's measurements, run from the repository root: `python -m benchmarks <name> ...`.

Code only; what the runs measured, with the machine and date, is in benchmarks/results/. This
package is not installed with breakhis-ft (the wheel carries `breakhis_ft` alone).
"""
