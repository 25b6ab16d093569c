"""``python -m fewbit ...``: same as the ``fewbit`` command."""

import sys

from fewbit.cli import main

if __name__ == "__main__":
    sys.exit(main())
