"""Make tests/ importable so test files can ``from clips import write_clip``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
