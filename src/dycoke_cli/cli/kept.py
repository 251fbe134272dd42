"""The command line's pictures: ``ask``/``caption --show-kept FILE.png`` and ``compare --picture
FILE.png`` (picture.py draws them from each answer's ``kept``). The path and matplotlib are
checked before a model is loaded; the frames come from the encoded clip, or are read again
small when its features came from the feature cache."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DycokeError, OutputError, UsageError

THUMB_SIDE = 192  # px: the longer side frames are read at when the encoded clip kept none


def check_picture_path(path: Path, flag: str) -> Path:
    """A .png path in a folder that exists and can be written, with matplotlib installed."""
    from ..picture import PictureUnavailable, require_matplotlib

    if path.suffix.lower() != ".png":
        raise UsageError(f"{flag} must name a .png file (got {path})")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"cannot write {path} (no such folder: {folder})")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {path} (permission denied)")
    try:
        require_matplotlib()
    except PictureUnavailable as exc:
        raise DycokeError(str(exc)) from None
    return path


def numbered(path: Path, index: int) -> Path:
    """The picture of the ``index``-th answer (0-based): FILE.png, then FILE-2.png, FILE-3.png ..."""
    return path if index == 0 else path.with_name(f"{path.stem}-{index + 1}{path.suffix}")


def thumbnails(enc, video_path, timeout_s: float):
    """One picture per cell (the first frame of each temporal step), uint8 [T, h, w, 3]."""
    from ..video.read import read_video

    frames = enc.video.frames
    if frames is None:  # features from the cache: read the same frames again, small
        frames = read_video(video_path, enc.video.info.requested, max_side=THUMB_SIDE, timeout_s=timeout_s).frames
    step = max(1, len(frames) // enc.frames)
    return frames[::step][: enc.frames]


def title(answer, speedup: float | None = None) -> str:
    """Method and retention, and the speedup measured against the first method (compare), or
    the FLOPs ratio estimated (a single answer has nothing to measure against)."""
    s = answer.stats
    head = f"{answer.method}: {100 * s.overall_retention:.1f} % of {s.visual_tokens} visual tokens\n" \
           f"{s.visual_tokens_prefill} in the prefill, {s.visual_tokens_decode} attended\n"
    if speedup is not None:
        return head + f"speedup {speedup:.2f}x (measured)"
    return head + f"LLM FLOPs / {s.flops_ratio_estimate:.2f} (estimated)"


def _write(panels, path: Path) -> None:
    from ..picture import PictureUnavailable, draw

    try:
        draw(panels, path)
    except PictureUnavailable as exc:
        raise DycokeError(str(exc)) from None
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc})") from None


def write_answer_picture(path: Path, answer, enc, video_path, timeout_s: float) -> None:
    from ..picture import Panel

    _write([Panel(title(answer), answer.kept.to_dict(), thumbnails(enc, video_path, timeout_s))], path)


def write_compare_picture(path: Path, comparison, enc, video_path, timeout_s: float) -> None:
    """One panel per method, side by side, titled with its measured speedup over the first."""
    from ..picture import Panel

    thumbs = thumbnails(enc, video_path, timeout_s)
    rows = comparison.rows()
    _write([Panel(title(a, row["speedup"]), a.kept.to_dict(), thumbs)
            for a, row in zip(comparison.results, rows)], path)
