"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, model_type ``qwen2_5_vl``).

What differs from LLaVA-OneVision, and where it is handled:

* **Frames.** Sampled by fps (the checkpoint's, default 2) between a minimum and a maximum
  count, unless the user names a count. Each frame is resized to ``smart_resize``'s size
  (multiples of 28, within the checkpoint's minimum and maximum pixels, aspect kept; bicubic
  with antialiasing) and normalised with the checkpoint's mean and std. Two consecutive frames
  form one *temporal step* (``temporal_patch_size``; an odd count repeats the last frame), cut
  into 14 px patches that the PatchMerger merges 2x2: a step gives (H/28)·(W/28) tokens in
  raster order. TTM's windows run over these steps.
* **Prompt.** ``<|vision_start|><|video_pad|>…<|vision_end|>``, no newline token.
* **Positions (M-RoPE).** Every position is a (t, h, w) triple. Text before the video counts
  up on all three; a video token at step t, row r, column c sits at
  ``start + (floor(t · tokens_per_second · seconds_per_step), r, c)`` with ``seconds_per_step``
  from the timestamps actually sampled; text after the video continues from the largest visual
  position + 1 (the Qwen reference rule; transformers 5.23's ``get_rope_index`` advances by
  ``max(grid_h, grid_w) // 2`` instead, which differs once the temporal positions outrun the
  grid: long clips). Tokens kept by TTM keep their original triples, and the text after the
  video keeps the full video's positions (as vLLM's EVS does). Decoding steps continue after
  the largest position, the same on all three axes. ``--positions`` does not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from .base import FamilyAdapter, LoadedModel, ModelDefaults, eos_ids, fps_defaults, fps_rule
from .checkpoint import read_json
from .preprocess import FrameSpec, patchify_video

PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE  # 28: frame sides are multiples of this
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT = 200  # smart_resize refuses more elongated frames


@dataclass(frozen=True)
class VideoSpec:
    """The checkpoint's video preprocessing (video_preprocessor_config.json, else defaults of
    transformers' Qwen2-VL video processor, with our own cap on frames)."""

    min_pixels: int = 128 * FACTOR * FACTOR
    max_pixels: int = 768 * FACTOR * FACTOR
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 64
    temporal_patch: int = 2

    @classmethod
    def from_folder(cls, folder: Path) -> "VideoSpec":
        """From video_preprocessor_config.json; a checkpoint with only the image processor's
        preprocessor_config.json lends it just its mean and std (its pixel limits are for
        images: up to 12.8 Mpx a picture, far beyond what a video's frames get)."""
        cfg = {}
        if (folder / "video_preprocessor_config.json").is_file():
            cfg = read_json(folder / "video_preprocessor_config.json", "video preprocessor config")
        elif (folder / "preprocessor_config.json").is_file():
            image = read_json(folder / "preprocessor_config.json", "preprocessor config")
            cfg = {k: image[k] for k in ("image_mean", "image_std") if k in image}
        try:
            spec = cls._from_dict(cfg)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"{folder}: bad video preprocessor config ({type(exc).__name__}: {exc})") from None
        ok = (FACTOR * FACTOR <= spec.min_pixels <= spec.max_pixels and spec.fps > 0 and len(spec.mean) == 3
              and len(spec.std) == 3 and all(spec.std) and 1 <= spec.min_frames <= spec.max_frames)
        if not ok:
            raise ModelError(f"{folder}: bad video preprocessor config (min/max pixels, fps, frame counts, mean/std)")
        return spec

    @classmethod
    def _from_dict(cls, cfg: dict) -> "VideoSpec":
        size = cfg.get("size") or {}
        return cls(
            min_pixels=int(size.get("shortest_edge", cfg.get("min_pixels", cls.min_pixels))),
            max_pixels=int(size.get("longest_edge", cfg.get("max_pixels", cls.max_pixels))),
            mean=tuple(float(x) for x in cfg.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(float(x) for x in cfg.get("image_std", OPENAI_CLIP_STD)),
            fps=float(cfg.get("fps", cls.fps)),
            min_frames=int(cfg.get("min_frames", cls.min_frames)),
            max_frames=int(min(cfg.get("max_frames", cls.max_frames), cls.max_frames)),
            temporal_patch=int(cfg.get("temporal_patch_size", 2)),
        )


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """Qwen2-VL's frame size: sides rounded to multiples of ``factor``, the area brought within
    [min_pixels, max_pixels] keeping the aspect ratio."""
    if max(height, width) / max(1, min(height, width)) > MAX_ASPECT:
        raise ModelError(f"frames of {width}x{height} are too elongated for Qwen2.5-VL (aspect over {MAX_ASPECT})")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(video, temporal: int = 2):
    """Normalised frames [F, C, H, W] -> (patches, grid) in the vision tower's order, 14 px
    patches (see :func:`~.preprocess.patchify_video`)."""
    return patchify_video(video, temporal, PATCH, MERGE)


def mrope_positions(start: int, steps: int, rows: int, cols: int, interval: float):
    """[3, steps·rows·cols] (t, h, w) positions of a video's tokens starting at ``start``."""
    import torch

    k = torch.arange(steps * rows * cols)
    t = k // (rows * cols)
    return torch.stack([(t * interval).long(), (k // cols) % rows, k % cols]) + start


class Qwen25VLAdapter(FamilyAdapter):
    model_type = "qwen2_5_vl"
    frames_per_step = 2

    def model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def folder_settings(self, folder, model, defaults):
        return {"defaults": fps_defaults(folder, defaults), "video_spec": VideoSpec.from_folder(folder)}

    def wrap(self, model, tokenizer, *, name: str, path: Path | None = None, defaults: ModelDefaults | None = None,
             video_spec: VideoSpec | None = None) -> LoadedModel:
        """Describe an already-built model; its text model must use the probing attention."""
        config, spec = model.config, video_spec or VideoSpec()
        text = config.text_config
        side = math.isqrt(spec.max_pixels)
        param = next(model.parameters())
        return LoadedModel(
            name=name, path=Path(path) if path is not None else Path(name), family=self.model_type, model=model,
            tokenizer=tokenizer, frame_spec=FrameSpec(side, side, spec.mean, spec.std),
            tokens_per_frame=spec.max_pixels // (FACTOR * FACTOR),  # per step, at the largest frames
            video_token_id=int(config.video_token_id), num_layers=int(text.num_hidden_layers),
            hidden_size=int(text.hidden_size), eos_token_ids=eos_ids(model, tokenizer),
            defaults=defaults or ModelDefaults(), device=param.device, dtype=param.dtype, adapter=self,
            video_spec=spec,
        )

    def default_frames(self, lm, info, fps=None, max_frames=None):
        """The processor's rule: ``round(duration * fps)`` within [min_frames, max_frames], even
        (``fps`` and ``max_frames``: the user's, else the checkpoint's)."""
        return fps_rule(lm, info, fps, max_frames, round)

    def target_size(self, lm, frames, height, width):
        return smart_resize(height, width, lm.video_spec.min_pixels, lm.video_spec.max_pixels)

    def preprocess(self, lm, frames, source=None, count=None):
        """uint8 [T, H, W, 3] -> normalised float32 [T, 3, H', W'] at smart_resize's size for the
        clip's size (``source``, else the frames')."""
        import torch

        spec = lm.video_spec
        h, w = self.target_size(lm, frames.shape[0], *(source or frames.shape[1:3]))
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)
        if x.shape[2:] != (h, w):
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
        return (x.float() - mean) / std

    def token_grid(self, lm, pixels):
        return pixels.shape[2] // FACTOR, pixels.shape[3] // FACTOR

    def encode_video(self, lm, pixels):
        """Frames [F, 3, H, W] -> (features [ceil(F/2), (H/28)·(W/28), D], None, no DeepStack)."""
        import torch

        patches, grid = patchify(pixels, lm.video_spec.temporal_patch)
        with torch.inference_mode():
            out = lm.model.model.get_video_features(patches.to(lm.device, lm.dtype), grid.to(lm.device),
                                                    return_dict=True).pooler_output[0]
        steps, rows, cols = int(grid[0, 0]), int(grid[0, 1]) // MERGE, int(grid[0, 2]) // MERGE
        if out.shape[0] != steps * rows * cols:
            raise ModelError(f"{lm.path}: vision tower gave {out.shape[0]} tokens, expected {steps * rows * cols}")
        return out.reshape(steps, rows * cols, -1), None, ()

    def positions(self, lm, span, kept, enc, seq, original):
        """[3, S]: text before, the kept tokens' (t, h, w), text after from the full video's
        largest position + 1 (see the module docstring)."""
        import torch

        start, end = span
        vision = lm.model.config.vision_config
        per_second = getattr(vision, "tokens_per_second", None) or getattr(lm.model.config, "tokens_per_second", 2)
        video = mrope_positions(start, enc.frames, enc.rows, enc.cols, per_second * enc.step_seconds)
        after = torch.arange(seq - end) + int(video.max()) + 1
        return torch.cat([torch.arange(start).expand(3, -1), video[:, kept.cpu()], after.expand(3, -1)], dim=1)
