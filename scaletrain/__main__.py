import sys

from scaletrain.cli import main

# The guard matters: data preparation spawns worker processes, which re-import __main__.
if __name__ == "__main__":
    sys.exit(main())
