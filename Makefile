# Both targets set everything up on a fresh machine (scripts/setup.sh is idempotent).
.PHONY: demo test setup experiments
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/attncap demo
test: setup
	.venv/bin/python -m pytest -q
# The CPU-scale experiment grid (docs/experiments.md); resumable. EXPERIMENT_FLAGS="--quick" for the small form,
# "--budget 60" to stop starting units after an hour.
experiments: setup
	.venv/bin/python -m vllm_attncap.rl.experiments $(EXPERIMENT_FLAGS)
