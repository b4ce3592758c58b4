# Both targets set everything up on a fresh machine (scripts/setup.sh is idempotent).
.PHONY: demo test test-fast setup experiments
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/attncap demo
test: setup
	.venv/bin/python -m pytest -q
# No vLLM engine or server and nothing marked slow: the reward SDK, the store, the kernels against their references.
test-fast: setup
	.venv/bin/python -m pytest -q -m "not engine and not slow"
# The CPU-scale experiment grid (docs/experiments.md); resumable. EXPERIMENT_FLAGS="--quick" for the small form,
# "--budget 60" to stop starting units after an hour.
experiments: setup
	.venv/bin/python -m vllm_attncap.rl.experiments $(EXPERIMENT_FLAGS)
