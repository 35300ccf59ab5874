"""Measuring models: the run report (and, later, evaluation tasks)."""
