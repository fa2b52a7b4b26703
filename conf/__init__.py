"""Hydra configs, installed as the package `breakhis_ft.conf` (see pyproject.toml)."""
