"""`python -m scaletrain.cli`, as `python -m scaletrain` (the package's old module ran too)."""

import sys

from scaletrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
