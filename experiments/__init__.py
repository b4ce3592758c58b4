"""Research harnesses of docs/experiments.md (not installed with the package)."""
