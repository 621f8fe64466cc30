"""``python -m fedllm``: the ``fedllm`` command, for environments without its console script on PATH."""

import sys

from fedllm.cli import main

if __name__ == "__main__":
    sys.exit(main())
