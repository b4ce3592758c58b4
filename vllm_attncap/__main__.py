"""``python -m vllm_attncap`` runs the ``attncap`` command line (see :mod:`vllm_attncap.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
