"""The example's tests import its package (``madlab``) and scripts from ``examples/``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
