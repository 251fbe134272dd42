"""Read a probed clip and run the vision tower over it, a chunk of frames at a time.

Only the features are kept, never all the frames: frames are decoded ``ENCODE_CHUNK`` at a time
(video.read.read_chunks, seeking in a long clip) and each chunk goes through the vision tower
before the next is decoded, so the peak memory follows the kept features. Progress events say
how many frames are decoded and encoded, and the time left.

The feature cache holds a clip's features in entries of ``CACHE_CHUNK`` frames, each with where
the reader stood after it: a later read of the same clip, model, frame count and dtype takes
the entries it finds from the first on and reads and encodes only what follows (an encoding
interrupted after an hour of work goes on from its last entry). The last entry says it is the
last, with the VideoInfo of the whole read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from dataclasses import replace

import torch

from .decoding.loop import sync
from .feature_cache import CachedFeatures, FeatureCache, FeatureKey, file_digest, model_identity
from .frame_count import ENCODE_CHUNK
from .results import Event, Progress, Stage
from .values import Clip, EncodedVideo, Video, VideoInfo
from .video.read import FrameChunk, ResumePoint, open_clip, read_chunks

CACHE_CHUNK = 16 * ENCODE_CHUNK  # frames per feature-cache entry (whole encode chunks: whole temporal steps)


def drain(events: Generator[Event, None, object]):
    """Run an event generator to its end and return its value."""
    while True:
        try:
            next(events)
        except StopIteration as stop:
            return stop.value


def encoding(lm, clip: Clip, num_frames: int, timeout_s: float = 60.0, cache: FeatureCache | None = None,
             timestamps: bool = False) -> Generator[Event, None, EncodedVideo]:
    """Read ``num_frames`` frames of a probed clip by time and run the vision tower over them, a
    chunk at a time (Progress events); with a ``cache``, take what it holds of this clip and store
    the rest as it is encoded (module docstring). ``timestamps``: the encoded clip carries the
    model's time instruction (LLaVA-OneVision's; None for a family that writes its own)."""
    store = None
    if cache is not None:
        yield Stage("looking up the feature cache")
        t0 = time.perf_counter()
        key = _feature_key(lm, clip, num_frames)
        if key is not None:
            store = _Store(cache, key, lm)
            if store.complete:
                return store.encoded(clip, num_frames, time.perf_counter() - t0, _time_text(lm, timestamps))
    return (yield from _read_and_encode(lm, clip, num_frames, timeout_s, timestamps, store))


def encode_video(lm, clip: Clip | str | os.PathLike, num_frames: int, timeout_s: float = 60.0,
                 cache: FeatureCache | None = None, timestamps: bool = False) -> EncodedVideo:
    """:func:`encoding` without events; a path is probed first."""
    clip = clip if isinstance(clip, Clip) else open_clip(clip, timeout_s=timeout_s)
    return drain(encoding(lm, clip, num_frames, timeout_s, cache, timestamps))


def step_seconds(timestamps: tuple[float, ...], frames_per_step: int) -> float:
    """The clip time one temporal step covers: the mean interval between sampled frames times
    the frames in a step (1 s per frame for a single frame)."""
    if len(timestamps) < 2:
        return float(frames_per_step)
    return (timestamps[-1] - timestamps[0]) / (len(timestamps) - 1) * frames_per_step


def _time_text(lm, timestamps: bool):
    """The time instruction of a VideoInfo, when timestamps are on (None otherwise)."""
    return (lambda info: lm.time_instruction(info.duration, info.timestamps)) if timestamps else (lambda info: None)


def _feature_key(lm, clip: Clip, num_frames: int) -> FeatureKey | None:
    model, content = model_identity(lm), clip.digest or file_digest(clip.path)
    if model is None or content is None:
        return None
    return FeatureKey(content, model, num_frames, str(lm.dtype))


class _Encoder:
    """The vision tower over a clip's frames, one chunk at a time as they are decoded: only the
    features are kept (in one tensor sized for every step asked for), never all the frames."""

    def __init__(self, lm, clip: Clip, num_frames: int):
        self.lm, self.num_frames = lm, num_frames
        self.source = (clip.info.height, clip.info.width)
        self.steps = -(-num_frames // lm.frames_per_step)
        self.features = self.levels = self.newline = None
        self.filled, self.grid, self.seconds = 0, (0, 0), 0.0

    def add(self, frames) -> None:
        """Encode uint8 frames [c, H, W, 3] (c even, but for the last chunk)."""
        t0 = time.perf_counter()
        pixels = self.lm.preprocess(frames, self.source, self.num_frames)
        feats, newline, deep = self.lm.encode_video(pixels)
        self.grid = self.lm.token_grid(pixels)
        self.put(feats, newline, deep)
        sync(self.lm.device)
        self.seconds += time.perf_counter() - t0

    def put(self, feats, newline, deep) -> None:
        """Append encoded steps [s, N, D] (and DeepStack levels of the same shape)."""
        if self.features is None:  # sized once: the grid is the same for every chunk of a clip
            self.features = feats.new_empty((self.steps, *feats.shape[1:]))
            self.levels = tuple(level.new_empty((self.steps, *level.shape[1:])) for level in deep)
        end = self.filled + feats.shape[0]
        self.features[self.filled:end] = feats
        for kept, level in zip(self.levels, deep):
            kept[self.filled:end] = level
        self.newline, self.filled = newline, end

    def span(self, start: int, end: int | None = None):
        """(features [steps, N, D], DeepStack levels) of the steps ``start:end`` encoded (views)."""
        end = self.filled if end is None else end
        return self.features[start:end], tuple(level[start:end] for level in self.levels)


def _read_and_encode(lm, clip: Clip, num_frames: int, timeout_s: float, timestamps: bool,
                     store: _Store | None) -> Generator[Event, None, EncodedVideo]:
    yield Stage("reading frames")
    started, read_s = time.perf_counter(), 0.0
    encoder = _Encoder(lm, clip, num_frames)
    resume, before = store.take_into(encoder) if store is not None else (None, ())
    encoded = resume.picked if resume is not None else 0
    # decoded at twice the model's own size on both axes: its resize is the one that counts
    chunks = read_chunks(clip, num_frames, ENCODE_CHUNK, size_for=lambda h, w: lm.target_size(num_frames, h, w),
                         timeout_s=timeout_s, resume=resume)
    while True:
        t0 = time.perf_counter()
        try:
            chunk = next(chunks)
        except StopIteration as stop:
            info = replace(stop.value, timestamps=(*before, *stop.value.timestamps))
            read_s += time.perf_counter() - t0
            break
        read_s += time.perf_counter() - t0
        yield Progress(chunk.settled, encoded, num_frames, _left(started, encoded, num_frames))
        encoder.add(chunk.frames)  # an even chunk: whole temporal steps (the last may be odd)
        encoded += len(chunk.frames)
        if store is not None:
            store.add(chunk, encoder, clip)
        yield Progress(chunk.settled, encoded, num_frames, _left(started, encoded, num_frames))
    if store is not None:
        store.finish(encoder, info)
    features, deepstack = encoder.span(0)
    return EncodedVideo(Video(None, info), features, encoder.newline, read_s, encoder.seconds, *encoder.grid,
                        step_seconds(info.timestamps, lm.frames_per_step), deepstack, _time_text(lm, timestamps)(info))


def _left(started: float, encoded: int, total: int) -> float | None:
    """Seconds left at the pace so far (None before any frame is encoded)."""
    if not encoded:
        return None
    return (time.perf_counter() - started) / encoded * max(total - encoded, 0)


class _Store:
    """A clip's entries in the feature cache: those found (from the first on), and the writing of
    the rest every CACHE_CHUNK frames as they are encoded, the last marked final."""

    def __init__(self, cache: FeatureCache, key: FeatureKey, lm):
        self.cache, self.key, self.lm = cache, key, lm
        self.hits: list[CachedFeatures] = []
        while (hit := cache.get(replace(key, chunk=len(self.hits)))) is not None:
            self.hits.append(hit)
            if hit.info.get("final"):
                break
        self.complete = bool(self.hits) and bool(self.hits[-1].info.get("final"))
        self.index, self.saved = len(self.hits), 0  # next entry; steps written or found
        self.pending: list[FrameChunk] = []  # read chunks encoded, not written yet

    def take_into(self, encoder: _Encoder) -> tuple[ResumePoint | None, tuple[float, ...]]:
        """Put the entries found into the encoder: where reading goes on, and their timestamps."""
        if not self.hits:
            return None, ()
        for hit in self.hits:
            deep = tuple(level.to(self.lm.device) for level in hit.deepstack)
            newline = None if hit.newline is None else hit.newline.to(self.lm.device)
            encoder.put(hit.features.to(self.lm.device), newline, deep)
            encoder.grid = (hit.info["layout"]["rows"], hit.info["layout"]["cols"])
        self.saved = encoder.filled
        times = tuple(t for hit in self.hits for t in hit.info["timestamps"])
        return ResumePoint.from_dict(self.hits[-1].info["resume"]), times

    def add(self, chunk: FrameChunk, encoder: _Encoder, clip: Clip) -> None:
        """A read chunk was encoded: write an entry once more than CACHE_CHUNK frames wait (so
        that the last entry, written by finish, is never empty)."""
        self.pending.append(chunk)
        if sum(len(c.timestamps) for c in self.pending) > CACHE_CHUNK:
            self._write(encoder, self.pending[:-1], clip.info, final=False)
            self.pending = self.pending[-1:]

    def finish(self, encoder: _Encoder, info: VideoInfo) -> None:
        if self.pending:
            self._write(encoder, self.pending, info, final=True)

    def _write(self, encoder: _Encoder, chunks: list[FrameChunk], info: VideoInfo, final: bool) -> None:
        times = tuple(t for c in chunks for t in c.timestamps)
        steps = -(-len(times) // self.lm.frames_per_step)
        features, deepstack = encoder.span(self.saved, self.saved + steps)
        layout = {"rows": encoder.grid[0], "cols": encoder.grid[1],
                  "step_seconds": step_seconds(info.timestamps, self.lm.frames_per_step) if final else 0.0}
        meta = {**replace(info, timestamps=times).to_dict(), "layout": layout, "final": final,
                "resume": chunks[-1].resume.to_dict()}
        self.cache.put(replace(self.key, chunk=self.index), features, encoder.newline, meta, deepstack)
        self.index, self.saved = self.index + 1, self.saved + steps

    def encoded(self, clip: Clip, num_frames: int, lookup_s: float, times) -> EncodedVideo:
        """The clip's EncodedVideo from entries that hold all of it."""
        last = self.hits[-1].info
        stamps = tuple(t for hit in self.hits for t in hit.info["timestamps"])
        info = replace(VideoInfo.from_dict(last), path=clip.path, requested=num_frames, timestamps=stamps)
        device = self.lm.device
        features = torch.cat([hit.features for hit in self.hits]).to(device)
        deepstack = tuple(torch.cat(levels).to(device) for levels in zip(*(hit.deepstack for hit in self.hits)))
        newline = self.hits[0].newline
        layout = last.get("layout") or {}
        return EncodedVideo(Video(None, info), features, None if newline is None else newline.to(device), lookup_s,
                            0.0, layout.get("rows", 0), layout.get("cols", 0), layout.get("step_seconds", 0.0),
                            deepstack, times(info))
