"""Runnable studies; installed as ``bilevel_experiments`` (see pyproject.toml).

Each folder holds the study's data/model builders, a README with its results table, and is run
by ``scripts/experiments.py <study>`` through the Hydra presets in ``configs/experiment/``.
"""
