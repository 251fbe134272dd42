"""Write a question-answer set of toy-world clips: ``n`` h264 mp4 clips plus ``qa.jsonl``, of
world v1 (one event per clip, render.py) or v2 (several, events.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DycokeError
from .events import event_questions, sample_event_spec
from .render import questions_for, sample_spec, write_clip

# world -> (draw a clip spec from a generator and variety, the spec's (kind, question, answer)s)
WORLDS = {
    "v1": (lambda rng, variety: sample_spec(rng, variety=variety), questions_for),
    "v2": (sample_event_spec, event_questions),
}


def write_dataset(out_dir: str | Path, n: int, seed: int, variety: bool = True, overwrite: bool = False,
                  world: str = "v1") -> Path:
    """Render ``n`` random clips of ``world`` (seeded by ``seed``) into ``out_dir/clips/`` and
    write ``out_dir/qa.jsonl``: one line per applicable question, ``{"video": "clips/NNNN.mp4",
    "question", "answer", "kind"}`` with the video path relative to ``out_dir``.

    Returns the path of ``qa.jsonl``. The same ``(n, seed, world)`` always gives the same clips.
    A folder that already holds files is refused (DycokeError) unless ``overwrite``."""
    sample, questions = WORLDS[world]
    out = Path(out_dir)
    _prepare(out, overwrite)
    rng = np.random.default_rng(seed)
    width = max(4, len(str(n - 1)))
    lines = []
    for i in range(n):
        spec = sample(rng, variety)
        rel = f"clips/{i:0{width}d}.mp4"
        write_clip(spec, out / rel)
        for kind, question, answer in questions(spec):
            lines.append(json.dumps({"video": rel, "question": question, "answer": answer, "kind": kind}))
    qa = out / "qa.jsonl"
    qa.write_text("\n".join(lines) + "\n")
    return qa


def _prepare(out: Path, overwrite: bool) -> None:
    """Create ``out/clips``; refuse a non-empty folder unless ``overwrite``; one-line errors."""
    try:
        if out.exists() and not out.is_dir():
            raise DycokeError(f"{out}: exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise DycokeError(f"{out}: the folder already holds files; choose a new or empty one "
                              "(or pass --force to replace its qa.jsonl and clips)")
        (out / "clips").mkdir(parents=True, exist_ok=True)
        probe = out / "clips" / ".dycoke-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise DycokeError(f"{out}: cannot write there ({exc.strerror or exc})") from None
