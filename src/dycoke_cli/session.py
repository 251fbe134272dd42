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
from .frame_count import fit_frames
from .options import CompressionOptions, Method, SamplingOptions
from .pipeline import PREFIX_PROBE, Prefix, answering, build_prefix, drain, encoding
from .results import Answer, Done, Event
from .values import EncodedVideo, Prompt


class Session:
    """One clip, one model, any number of questions (see the module docstring).

    ``frames``: frames to sample (default: the model's). ``compression``: the default options
    of every question (a question may pass its own). ``cache``: the on-disk feature cache, or
    None to encode afresh. ``system``: a system message before the video in every prompt.
    ``digest``: the clip's SHA-256, when the caller has hashed the bytes it will read (else the
    feature cache hashes the file itself).
    """

    def __init__(self, lm, video: str | os.PathLike, *, frames: int | None = None,
                 compression: CompressionOptions = CompressionOptions(), cache: FeatureCache | None = None,
                 timeout_s: float = 60.0, system: str | None = None, digest: str | None = None):
        self.lm, self.video, self.cache, self.timeout_s, self.system = lm, video, cache, timeout_s, system
        self.digest = digest  # the clip's SHA-256 when the caller has it (the feature cache's key)
        self.compression = compression.resolve(lm)
        self.frames = frames
        self._default_frames: int | None = None  # the model's frame count for this clip (Qwen: by fps)
        self.encoded: EncodedVideo | None = None
        self._prefixes: dict[CompressionOptions, Prefix] = {}
        self.kept = KeptSteps()  # the static decoding step (a CUDA graph), replayed by later answers
        self.answers: list[Answer] = []

    def set_frames(self, frames: int | None) -> None:
        """Sample another number of frames: the clip is encoded again at the next question."""
        self.frames, self.encoded = frames, None
        self._prefixes.clear()
        self.kept.clear()

    def set_compression(self, compression: CompressionOptions) -> None:
        self.compression = compression.resolve(self.lm)

    def rebind(self, video: str | os.PathLike, digest: str | None = None) -> None:
        """Read the clip from another name from now on: the same bytes (the server's sessions
        are keyed by content, and each request opens the clip anew), with their digest."""
        self.video, self.digest = video, digest

    def forget_answers(self) -> None:
        """Drop the answers kept so far (a long-lived session would otherwise keep them all)."""
        self.answers.clear()

    def nbytes(self) -> int:
        """Bytes of the tensors this session keeps between answers: the encoded video, the
        prefixes' keys and values, and the kept decoding step's buffers."""
        total = 0
        enc = self.encoded
        if enc is not None:
            total += sum(t.numel() * t.element_size() for t in (enc.features, enc.newline) if t is not None)
        total += sum(prefix.nbytes for prefix in self._prefixes.values())  # a hybrid's linear states too
        return total + self.kept.nbytes()

    def prompt(self, question: str, thinking: bool | str | None = None) -> Prompt:
        """``question``'s prompt after this session's system message, rendered once."""
        return render_prompt(self.lm, question, self.system, thinking)

    def encoding(self, prompt: Prompt | None = None, compression: CompressionOptions | None = None) -> Iterator[Event]:
        """Events of encoding the clip (none while the encoded frames still fit); sets ``encoded``.
        The frame count is fitted to the context for this prompt and method (resolved): a
        method or a question that needs fewer frames than were encoded re-encodes (the feature
        cache usually has them)."""
        if self.frames is None and self._default_frames is None:  # the clip's default, found once
            self._default_frames = self.lm.default_frames(self.video)
        prompt = prompt if prompt is not None else self.prompt(PREFIX_PROBE)
        n = fit_frames(self.lm, self.frames, compression or self.compression, prompt, self._default_frames)
        if self.encoded is None or self.encoded.video.info.requested != n:
            self.encoded = yield from encoding(self.lm, self.video, n, self.timeout_s, self.cache, self.digest)
            self._prefixes.clear()

    def stream(self, question: str, sampling: SamplingOptions = SamplingOptions(),
               compression: CompressionOptions | None = None, trace: bool = False) -> Iterator[Event]:
        """Events of one answer, ending with ``Done(answer)``. The prompt is rendered and the
        options resolved once, here. ``trace``: record what it kept (``Answer.kept``)."""
        opts = self.compression if compression is None else compression.resolve(self.lm)
        prompt = self.prompt(question, sampling.thinking)
        before = self.encoded
        yield from self.encoding(prompt, opts)
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
        result = replace(result, video=enc.video.info)
        if encoded_before:  # this answer spent no time reading or encoding the clip
            timings = replace(result.stats.timings, read_video=0.0, encode=0.0)
            result = replace(result, stats=replace(result.stats, timings=timings))
        self.answers.append(result)
        yield Done(result)

    def ask(self, question: str, sampling: SamplingOptions = SamplingOptions(),
            compression: CompressionOptions | None = None, trace: bool = False) -> Answer:
        for event in self.stream(question, sampling, compression, trace):
            if isinstance(event, Done):
                return event.answer
        raise AssertionError("stream() ended without an answer")  # pragma: no cover


def run(lm, video_path: str | os.PathLike, question: str, *, frames: int | None = None,
        compression: CompressionOptions = CompressionOptions(), sampling: SamplingOptions = SamplingOptions(),
        timeout_s: float = 60.0, cache: FeatureCache | None = None) -> Iterator[Event]:
    """Events of one question about one file, ending with ``Done(answer)``."""
    session = Session(lm, video_path, frames=frames, compression=compression, cache=cache, timeout_s=timeout_s)
    yield from session.stream(question, sampling)


def ask(lm, video_path: str | os.PathLike, question: str, *, frames: int | None = None,
        compression: CompressionOptions = CompressionOptions(), sampling: SamplingOptions = SamplingOptions(),
        timeout_s: float = 60.0, cache: FeatureCache | None = None) -> Answer:
    """Read, encode and answer in one call (the Python API behind ``dycoke ask``)."""
    session = Session(lm, video_path, frames=frames, compression=compression, cache=cache, timeout_s=timeout_s)
    return session.ask(question, sampling)


__all__ = ["Session", "run", "ask", "drain"]
