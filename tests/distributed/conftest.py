"""Distributed tests spawn their own processes (tests/distributed/spawn.py); this makes
the helper importable as `spawn` from the test modules and from the spawned children."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
