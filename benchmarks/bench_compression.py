#!/usr/bin/env python
"""Where the time and memory go: uncompressed vs DyCoke vs FastV on the LLaVA-OneVision-0.5B
architecture (random weights), side by side. Same as `dycoke bench`.

    python benchmarks/bench_compression.py                      # 8, 16, 32 frames, bf16 if the CPU has it
    python benchmarks/bench_compression.py --quick              # scaled-down model: a smoke test
    python benchmarks/bench_compression.py --json out.json --plot out.png --frames 8,16

The implementation lives in dycoke_cli/bench.py; see its docstring for what is measured and how.
"""

import sys
from pathlib import Path

try:
    from dycoke_cli.bench import main
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from dycoke_cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
