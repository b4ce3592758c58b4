"""Experiments run from the repository (not installed): ``python -m experiments.<name>``."""
