"""Write a question-answer set of toy-world clips: ``n`` h264 mp4 clips plus ``qa.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .render import questions_for, sample_spec, write_clip


def write_dataset(out_dir: str | Path, n: int, seed: int, variety: bool = True) -> Path:
    """Render ``n`` random clips (seeded by ``seed``) into ``out_dir/clips/`` and write
    ``out_dir/qa.jsonl``: one line per applicable question, ``{"video": "clips/NNNN.mp4",
    "question", "answer", "kind"}`` with the video path relative to ``out_dir``.

    Returns the path of ``qa.jsonl``. The same ``(n, seed)`` always gives the same clips."""
    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = max(4, len(str(n - 1)))
    lines = []
    for i in range(n):
        spec = sample_spec(rng, variety=variety)
        rel = f"clips/{i:0{width}d}.mp4"
        write_clip(spec, out / rel)
        for kind, question, answer in questions_for(spec):
            lines.append(json.dumps({"video": rel, "question": question, "answer": answer, "kind": kind}))
    qa = out / "qa.jsonl"
    qa.write_text("\n".join(lines) + "\n")
    return qa
