"""Qwen3-VL, dense (``Qwen3VLForConditionalGeneration``, model_type ``qwen3_vl``) and MoE
(``Qwen3VLMoeForConditionalGeneration``, ``qwen3_vl_moe``: only the text model's MLP differs).

What differs from Qwen2.5-VL, and where it is handled (transformers' ``models/qwen3_vl`` is the
reference: modeling, processing and video processing):

* **Frames.** 16 px patches, 2x2 merge, 2 frames a temporal step: one token per 32x32 px per
  step. Sampled at the checkpoint's fps within ``min_frames`` and ``max_frames`` (our default
  caps at ``MAX_FRAMES``; ``--frames`` goes further). The resize (:func:`smart_resize`) fits the
  whole clip, not one frame, into ``size``: ``shortest_edge`` and ``longest_edge`` are pixels
  summed over the frames (with ``cap_pixels_per_frame``, a per-frame ceiling of
  ``max_video_tokens`` tokens as well). Mean and std from the checkpoint (ImageNet's 0.5).
* **Timestamps between steps.** The processor writes each temporal step as
  ``<{t:.1f} seconds><|vision_start|>`` + the step's ``<|video_pad|>`` tokens + ``<|vision_end|>``,
  ``t`` the mean of the step's first and last frame times. Our times are the presentation
  times actually sampled. The visual tokens are many spans with text between them
  (:class:`~dycoke_cli.values.VisualSpan`); TTM keeps a variable number of tokens per step and
  the prompt carries exactly that many pads in each step; the timestamp text always stays.
* **DeepStack.** The vision tower also returns one feature level per entry of
  ``deepstack_visual_indexes``; the text model adds level k to the visual positions' hidden
  states after decoder layer k. :meth:`Qwen3VLAdapter.encode_video` returns the levels, the
  token plan keeps the same tokens of every level, and the decoding loop adds them.
* **Positions.** ``get_rope_index``'s rule: text advances all three axes by one per token; the
  tokens of a step sit at ``(cur, cur + row, cur + col)``, then ``cur`` advances by
  ``max(rows, cols)``. The rotary embedding interleaves the axes (the checkpoint's own module
  does that). Kept tokens keep their ids; text after the video keeps the full video's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import ModelError
from .base import FamilyAdapter, LoadedModel, ModelDefaults, eos_ids, fps_defaults
from .checkpoint import read_json
from .preprocess import FrameSpec, patchify_video

PATCH = 16
MERGE = 2
FACTOR = PATCH * MERGE  # 32: frame sides are multiples of this
IMAGENET_STANDARD = (0.5, 0.5, 0.5)
MAX_ASPECT = 200  # the processor refuses more elongated frames
MAX_FRAMES = 64  # our default cap on sampled frames (the processor's is 768); --frames goes beyond


@dataclass(frozen=True)
class VideoSpec:
    """The checkpoint's video preprocessing (video_preprocessor_config.json), else the defaults
    of transformers' Qwen3-VL video processor with our cap on frames. Pixel limits are sums
    over the clip's frames."""

    min_pixels: int = 128 * FACTOR * FACTOR
    max_pixels: int = 768 * FACTOR * FACTOR
    mean: tuple[float, float, float] = IMAGENET_STANDARD
    std: tuple[float, float, float] = IMAGENET_STANDARD
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = MAX_FRAMES
    temporal_patch: int = 2
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768

    @classmethod
    def from_folder(cls, folder: Path) -> "VideoSpec":
        path = folder / "video_preprocessor_config.json"
        cfg = read_json(path, "video preprocessor config") if path.is_file() else {}
        try:
            size = cfg.get("size") or {}
            spec = cls(
                min_pixels=int(size.get("shortest_edge", cls.min_pixels)),
                max_pixels=int(size.get("longest_edge", cls.max_pixels)),
                mean=tuple(float(x) for x in cfg.get("image_mean", IMAGENET_STANDARD)),
                std=tuple(float(x) for x in cfg.get("image_std", IMAGENET_STANDARD)),
                fps=float(cfg.get("fps", cls.fps)),
                min_frames=int(cfg.get("min_frames", cls.min_frames)),
                max_frames=int(min(cfg.get("max_frames", MAX_FRAMES), MAX_FRAMES)),
                temporal_patch=int(cfg.get("temporal_patch_size", 2)),
                cap_pixels_per_frame=bool(cfg.get("cap_pixels_per_frame") or False),
                max_video_tokens=int(cfg.get("max_video_tokens") or cls.max_video_tokens),
            )
            sizes = (int(cfg.get("patch_size", PATCH)), int(cfg.get("merge_size", MERGE)))
        except (TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"{folder}: bad video preprocessor config ({type(exc).__name__}: {exc})") from None
        ok = (0 < spec.min_pixels <= spec.max_pixels and spec.fps > 0 and len(spec.mean) == 3 and len(spec.std) == 3
              and all(spec.std) and 1 <= spec.min_frames <= spec.max_frames and spec.temporal_patch == 2
              and spec.max_video_tokens >= 1 and sizes == (PATCH, MERGE))
        if not ok:
            raise ModelError(f"{folder}: bad video preprocessor config (size, fps, frame counts, mean/std, "
                             f"patch {PATCH}, merge {MERGE} and temporal patch 2 are supported)")
        return spec

    def frame_budget(self, frames: int) -> int:
        """``max_pixels`` as the resize applies it to a clip of ``frames`` frames."""
        if not self.cap_pixels_per_frame:
            return self.max_pixels
        per_frame = max(min(self.max_video_tokens * FACTOR * FACTOR, self.max_pixels // frames),
                        int(self.min_pixels * 1.05))
        return per_frame * frames


def smart_resize(frames: int, height: int, width: int, min_pixels: int, max_pixels: int,
                 factor: int = FACTOR, temporal: int = 2) -> tuple[int, int]:
    """Qwen3-VL's frame size for a clip of ``frames`` frames: sides in multiples of ``factor``,
    ``frames x h x w`` (frames rounded to whole steps) within [min_pixels, max_pixels]."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ModelError(f"frames of {width}x{height} are too elongated for Qwen3-VL (aspect over {MAX_ASPECT})")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t = round(max(frames, temporal) / temporal) * temporal
    if t * h * w > max_pixels:
        beta = math.sqrt(max(frames, temporal) * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (max(frames, temporal) * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def step_times(timestamps, temporal: int = 2) -> list[float]:
    """The time of each temporal step: the mean of its first and last frame's (an odd count
    repeats the last frame), as the processor's ``_calculate_timestamps`` computes it."""
    times = list(timestamps)
    if pad := -len(times) % temporal:
        times += [times[-1]] * pad
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


class Qwen3VLAdapter(FamilyAdapter):
    model_type = "qwen3_vl"
    frames_per_step = 2

    def model_class(self):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def folder_settings(self, folder, model, defaults):
        return {"defaults": fps_defaults(folder, defaults), "video_spec": VideoSpec.from_folder(folder)}

    def wrap(self, model, tokenizer, *, name: str, path: Path | None = None, defaults: ModelDefaults | None = None,
             video_spec: VideoSpec | None = None) -> LoadedModel:
        """Describe an already-built model; its text model must use the probing attention."""
        config, spec = model.config, video_spec or VideoSpec()
        text = config.text_config
        # The largest step: the clip's pixel budget over its fewest frames (a bound for fitting
        # the context; more frames share the same budget).
        per_frame = spec.frame_budget(spec.min_frames) // max(spec.min_frames, 2)
        side = max(FACTOR, math.isqrt(per_frame))
        param = next(model.parameters())
        lm = LoadedModel(
            name=name, path=Path(path) if path is not None else Path(name), family=self.model_type, model=model,
            tokenizer=tokenizer, frame_spec=FrameSpec(side, side, spec.mean, spec.std),
            tokens_per_frame=max(1, per_frame // (FACTOR * FACTOR)),
            video_token_id=int(config.video_token_id), num_layers=int(text.num_hidden_layers),
            hidden_size=int(text.hidden_size), eos_token_ids=eos_ids(model, tokenizer),
            defaults=defaults or ModelDefaults(), device=param.device, dtype=param.dtype, adapter=self,
            video_spec=spec,
        )
        lm.text_per_step = len(self.timestamp_ids(lm, 9999.9)) + 2  # "<9999.9 seconds>", start and end
        return lm

    def default_frames(self, lm, path):
        """The processor's rule: ``int(duration * fps)`` within [min_frames, max_frames], even."""
        if lm.defaults.num_frames is not None:
            return lm.defaults.num_frames
        from ..video.read import probe_video

        spec = lm.video_spec
        n = min(max(int((probe_video(path).duration or 0.0) * spec.fps), spec.min_frames), spec.max_frames)
        return max(spec.temporal_patch, n - n % spec.temporal_patch)

    def target_size(self, lm, frames: int, height: int, width: int) -> tuple[int, int]:
        spec = lm.video_spec
        return smart_resize(frames, height, width, spec.min_pixels, spec.frame_budget(frames))

    def preprocess(self, lm, frames, source=None):
        """uint8 [T, H, W, 3] -> normalised float32 [T, 3, H', W'] at smart_resize's size for the
        clip's size (``source``, else the frames')."""
        import torch

        spec = lm.video_spec
        h, w = self.target_size(lm, frames.shape[0], *(source or frames.shape[1:3]))
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)
        if x.shape[2:] != (h, w):  # on the uint8 frames, as the processor resizes them
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        return (x.float() / 255 - mean) / std

    def token_grid(self, lm, pixels):
        return pixels.shape[2] // FACTOR, pixels.shape[3] // FACTOR

    def encode_video(self, lm, pixels):
        """Frames [F, 3, H, W] -> (features [ceil(F/2), (H/32)·(W/32), D], None, DeepStack levels
        of the same shape; none for Qwen3.5)."""
        import torch

        patches, grid = patchify_video(pixels, lm.video_spec.temporal_patch, PATCH, MERGE)
        with torch.inference_mode():
            out = lm.model.model.get_video_features(patches.to(lm.device, lm.dtype), grid.to(lm.device),
                                                    return_dict=True)
        steps, rows, cols = int(grid[0, 0]), int(grid[0, 1]) // MERGE, int(grid[0, 2]) // MERGE
        features = out.pooler_output[0]
        if features.shape[0] != steps * rows * cols:
            raise ModelError(f"{lm.path}: vision tower gave {features.shape[0]} tokens, expected {steps * rows * cols}")
        deepstack = getattr(out, "deepstack_features", None) or ()  # Qwen3.5 has none
        levels = tuple(level[0].reshape(steps, rows * cols, -1) for level in deepstack)
        return features.reshape(steps, rows * cols, -1), None, levels

    def prompt_ids(self, lm, question, system=None, thinking=None):
        """Token ids before and after the video: the chat template's
        ``<|vision_start|><|video_pad|><|vision_end|>`` is left out (each step brings its own)."""
        before, after = super().prompt_ids(lm, question, system, thinking)
        config = lm.model.config
        if len(before) and len(after) and int(before[-1]) == config.vision_start_token_id \
                and int(after[0]) == config.vision_end_token_id:
            return before[:-1], after[1:]
        return before, after

    def timestamp_ids(self, lm, seconds: float) -> tuple[int, ...]:
        return _encode(lm.tokenizer, f"<{seconds:.1f} seconds>")

    def video_part(self, lm, enc, plan):
        """The video part of the prompt, in order: per step its timestamp ids and start marker,
        its kept tokens, its end marker. Returns (pieces, visual offsets [M] within the part,
        the part's length)."""
        import torch

        config = lm.model.config
        start_id, end_id = config.vision_start_token_id, config.vision_end_token_id
        kept = torch.bincount(plan.index.cpu() // enc.tokens_per_frame, minlength=enc.frames).tolist()
        pieces, offsets, at, taken = [], [], 0, 0
        for seconds, count in zip(self.step_times(enc), kept):
            ids = torch.tensor([*self.timestamp_ids(lm, seconds), start_id], dtype=torch.long)
            pieces += [ids, plan.tokens[taken : taken + count], torch.tensor([end_id], dtype=torch.long)]
            at += len(ids)
            offsets.append(torch.arange(at, at + count))
            at += count + 1
            taken += count
        return pieces, torch.cat(offsets), at

    def step_times(self, enc) -> list[float]:
        times = step_times(enc.video.info.timestamps, self.frames_per_step)
        if len(times) < enc.frames:  # a clip with fewer distinct frames than steps: none here, but keep the count
            times += [times[-1] if times else 0.0] * (enc.frames - len(times))
        return times[: enc.frames]

    def positions(self, lm, span, kept, enc, seq, original):
        """[3, S] by ``get_rope_index``'s rule over the full video, gathered at the kept tokens."""
        import torch

        start = span[0]
        rows, cols, n = enc.rows, enc.cols, enc.tokens_per_frame
        k = torch.arange(n)
        grid = torch.stack([torch.zeros(n, dtype=torch.long), k // cols, k % cols])  # a step's (0, r, c)
        kept = kept.cpu()
        parts, cur = [torch.arange(start).expand(3, -1)], start
        for step, seconds in enumerate(self.step_times(enc)):
            text = len(self.timestamp_ids(lm, seconds)) + 1  # the timestamp and the start marker
            parts.append((torch.arange(text) + cur).expand(3, -1))
            cur += text
            mine = kept[(kept >= step * n) & (kept < (step + 1) * n)] - step * n
            parts.append(grid[:, mine] + cur)
            cur += max(rows, cols)
            parts.append(torch.full((3, 1), cur))  # the end marker
            cur += 1
        used = sum(p.shape[1] for p in parts)
        parts.append((torch.arange(seq - used) + cur).expand(3, -1))
        return torch.cat(parts, dim=1)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """The MoE variant: the same vision tower, prompt and positions; only the text MLP differs."""

    model_type = "qwen3_vl_moe"

    def model_class(self):
        from transformers import Qwen3VLMoeForConditionalGeneration

        return Qwen3VLMoeForConditionalGeneration


@lru_cache(maxsize=4096)
def _encode(tokenizer, text: str) -> tuple[int, ...]:
    """Token ids of a timestamp (the same few strings again and again)."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
