# Both targets set everything up on a fresh machine (scripts/setup.sh is idempotent).
.PHONY: demo test setup
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/attncap demo
test: setup
	.venv/bin/python -m pytest -q
