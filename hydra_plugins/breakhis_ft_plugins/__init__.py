"""breakhis-ft's Hydra plugins, found by Hydra in its `hydra_plugins` namespace package:
`launcher=array` (array_launcher.py: one task's share of a sweep) and the Optuna sweeper whose
processes share one study (shared_study_sweeper.py)."""
