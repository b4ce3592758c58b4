# Both targets set everything up on a fresh machine (scripts/setup.sh is idempotent).
.PHONY: demo test test-fast setup experiments
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/attncap demo
# Two pytest-xdist workers (CI has 2 cores); a module's tests stay on one worker (tests/conftest.py's scheduler).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: setup
	.venv/bin/python -m pytest -q $(XDIST)
# No vLLM engine or server and nothing marked slow: the reward SDK, the store, the kernels against their references.
test-fast: setup
	.venv/bin/python -m pytest -q $(XDIST) -m "not engine and not slow"
# The CPU-scale training grid (docs/experiments.md): unit JSONs into experiments/results/training/ (committed), then
# the doc's training section regenerated from them; resumable. EXPERIMENT_FLAGS="--quick --out runs/training-quick"
# for the tiny form, "--budget 60" to start no unit after an hour, "--report-only" to only regenerate the section.
experiments: setup
	.venv/bin/python -m experiments.training $(EXPERIMENT_FLAGS)
