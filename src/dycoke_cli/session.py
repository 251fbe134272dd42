"""Many questions about one clip: the clip is read and encoded once (and its features kept in
the on-disk cache), and the prompt up to the question, its KV included, is computed once per
compression setting. Each question then prefills only its own tokens.

    from dycoke_cli import load_model, Session
    session = Session(load_model("demo"), "clip.mp4")
    session.ask("what color is the cup?").text

:func:`run` and :func:`ask` are one question about one file, through a session of their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

from .decoding.prompt import render_prompt
from .decoding.static import KeptSteps
from .feature_cache import FeatureCache
from .frame_count import FrameCount, choose_frames, timestamps_on
from .options import CompressionOptions, FrameOptions, Method, SamplingOptions
from .pipeline import PREFIX_PROBE, Prefix, answering, build_prefix, drain, encoding
from .results import Answer, Done, Event, FramesChosen
from .values import EncodedVideo, Prompt
from .video.read import Clip, open_clip


class Session:
    """One clip, one model, any number of questions (see the module docstring).

    ``video``: a :class:`~dycoke_cli.video.read.Clip` (probed already) or a path (probed once, at
    the first question). ``frames``: a count, ``"max"``, or a :class:`FrameOptions` (default: the
    model's rule). ``compression``: the default options of every question (a question may pass
    its own). ``cache``: the on-disk feature cache, or None to encode afresh. ``system``: a system
    message before the video in every prompt. ``digest``: the clip's SHA-256, when the caller has
    hashed the bytes it will read (else the feature cache hashes the file itself). ``ceiling``:
    the most frames whoever runs the tool allows (the server's --max-frames).
    """

    def __init__(self, lm, video: Clip | str | os.PathLike, *, frames: int | str | FrameOptions | None = None,
                 compression: CompressionOptions = CompressionOptions(), cache: FeatureCache | None = None,
                 timeout_s: float = 60.0, system: str | None = None, digest: str | None = None,
                 ceiling: int | None = None):
        self.lm, self.cache, self.timeout_s, self.system, self.ceiling = lm, cache, timeout_s, system, ceiling
        self._clip = video if isinstance(video, Clip) else None
        self.video = video.path if isinstance(video, Clip) else video
        self.digest = video.digest if isinstance(video, Clip) else digest
        self.compression = compression.resolve(lm)
        self.frame_options = _frame_options(frames)
        self.count: FrameCount | None = None  # the frame count of the clip encoded, and what chose it
        self.encoded: EncodedVideo | None = None
        self._prefixes: dict[CompressionOptions, Prefix] = {}
        self.kept = KeptSteps()  # the static decoding step (a CUDA graph), replayed by later answers
        self.answers: list[Answer] = []

    @property
    def clip(self) -> Clip:
        """The clip, probed once (the first time it is needed)."""
        if self._clip is None:
            self._clip = open_clip(self.video, digest=self.digest, timeout_s=self.timeout_s)
        return self._clip

    @property
    def frames(self) -> int | str | None:
        return self.frame_options.frames

    def set_frames(self, frames: int | str | None) -> None:
        """Sample another number of frames: the clip is encoded again at the next question."""
        self.frame_options = replace(self.frame_options, frames=frames).validate()
        self.encoded = None
        self._prefixes.clear()
        self.kept.clear()

    def set_compression(self, compression: CompressionOptions) -> None:
        self.compression = compression.resolve(self.lm)

    def rebind(self, clip: Clip) -> None:
        """Read the clip through another probed Clip from now on: the same bytes (the server's
        sessions are keyed by content, and each request opens the clip anew)."""
        self._clip, self.video, self.digest = clip, clip.path, clip.digest

    def forget_answers(self) -> None:
        """Drop the answers kept so far (a long-lived session would otherwise keep them all)."""
        self.answers.clear()

    def nbytes(self) -> int:
        """Bytes of the tensors this session keeps between answers: the encoded video, the
        prefixes' keys and values, and the kept decoding step's buffers."""
        total = 0
        enc = self.encoded
        if enc is not None:
            total += sum(t.numel() * t.element_size() for t in (enc.features, enc.newline, *enc.deepstack)
                         if t is not None)
        total += sum(prefix.nbytes for prefix in self._prefixes.values())  # a hybrid's linear states too
        return total + self.kept.nbytes()

    def prompt(self, question: str, thinking: bool | str | None = None) -> Prompt:
        """``question``'s prompt after this session's system message, rendered once."""
        return render_prompt(self.lm, question, self.system, thinking)

    def encoding(self, prompt: Prompt | None = None, compression: CompressionOptions | None = None,
                 max_new_tokens: int = SamplingOptions.max_new_tokens) -> Iterator[Event]:
        """Events of encoding the clip (none while the encoded frames still fit); sets ``encoded``.
        The frame count is chosen for this prompt and method (frame_count.choose_frames): a
        method or a question that needs fewer frames than were encoded re-encodes (the feature
        cache usually has them)."""
        opts = self.compression if compression is None else compression.resolve(self.lm)
        prompt = prompt if prompt is not None else self.prompt(PREFIX_PROBE)
        count = choose_frames(self.lm, self.clip.info, self.frame_options, opts, prompt, max_new_tokens, self.ceiling)
        yield FramesChosen(count.count, count.chosen_by, count.bounds)
        if self.encoded is None or self.encoded.video.info.requested != count.count:
            timestamps = timestamps_on(self.lm, self.frame_options)
            self.encoded = yield from encoding(self.lm, self.clip, count.count, self.timeout_s, self.cache, timestamps)
            self._prefixes.clear()
        self.count = count

    def stream(self, question: str, sampling: SamplingOptions = SamplingOptions(),
               compression: CompressionOptions | None = None, trace: bool = False) -> Iterator[Event]:
        """Events of one answer, ending with ``Done(answer)``. The prompt is rendered and the
        options resolved once, here. ``trace``: record what it kept (``Answer.kept``)."""
        opts = self.compression if compression is None else compression.resolve(self.lm)
        prompt = self.prompt(question, sampling.thinking)
        before = self.encoded
        yield from self.encoding(prompt, opts, sampling.max_new_tokens)
        enc = self.encoded
        encoded_before = enc is before
        prefix, new = None, False
        if opts.method != Method.fastv:  # FastV selects by the question: no prefix without it
            prefix = self._prefixes.get(opts)
            if prefix is None or not prefix.precedes(prompt):  # a template may put text of the question first
                prefix = self._prefixes[opts] = build_prefix(self.lm, enc, opts, prompt)
                new = True
        result = yield from answering(self.lm, enc, prompt, opts, sampling, prefix, prefix_is_new=new,
                                      kept=self.kept, trace=trace)
        stats = replace(result.stats, frames_chosen_by=self.count.chosen_by, frame_bounds=self.count.bounds or None)
        if encoded_before:  # this answer spent no time reading or encoding the clip
            stats = replace(stats, timings=replace(stats.timings, read_video=0.0, encode=0.0))
        result = replace(result, video=enc.video.info, stats=stats,
                         options={**result.options, **self.frame_options.to_dict()})
        self.answers.append(result)
        yield Done(result)

    def ask(self, question: str, sampling: SamplingOptions = SamplingOptions(),
            compression: CompressionOptions | None = None, trace: bool = False) -> Answer:
        for event in self.stream(question, sampling, compression, trace):
            if isinstance(event, Done):
                return event.answer
        raise AssertionError("stream() ended without an answer")  # pragma: no cover


def _frame_options(frames: int | str | FrameOptions | None) -> FrameOptions:
    if isinstance(frames, FrameOptions):
        return frames.validate()
    return FrameOptions(frames=frames).validate()


def run(lm, video_path: str | os.PathLike, question: str, *, frames: int | str | FrameOptions | None = None,
        compression: CompressionOptions = CompressionOptions(), sampling: SamplingOptions = SamplingOptions(),
        timeout_s: float = 60.0, cache: FeatureCache | None = None) -> Iterator[Event]:
    """Events of one question about one file, ending with ``Done(answer)``."""
    session = Session(lm, video_path, frames=frames, compression=compression, cache=cache, timeout_s=timeout_s)
    yield from session.stream(question, sampling)


def ask(lm, video_path: str | os.PathLike, question: str, *, frames: int | str | FrameOptions | None = None,
        compression: CompressionOptions = CompressionOptions(), sampling: SamplingOptions = SamplingOptions(),
        timeout_s: float = 60.0, cache: FeatureCache | None = None) -> Answer:
    """Read, encode and answer in one call (the Python API behind ``dycoke ask``)."""
    session = Session(lm, video_path, frames=frames, compression=compression, cache=cache, timeout_s=timeout_s)
    return session.ask(question, sampling)


__all__ = ["Session", "run", "ask", "drain"]
