"""Frame preprocessing: uint8 RGB frames -> normalised pixel tensors for the vision tower.

The stock transformers video processor needs torchvision, which is not always installable,
so resizing and normalisation are done here from the values in the checkpoint's
(video_)preprocessor_config.json. Training and inference share this one function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# PIL resampling codes as stored in Hugging Face preprocessor configs.
_PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# Files a checkpoint may keep its video preprocessing in, most specific first.
PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class FrameSpec:
    """How frames must look when they enter the vision tower."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = 3  # PIL code; 3 = bicubic, LLaVA-OneVision's choice
    rescale_factor: float = 1 / 255

    @property
    def resample_name(self) -> str:
        return _PIL_RESAMPLE_NAMES.get(self.resample, str(self.resample))

    def to_dict(self) -> dict:
        return {
            "size": {"height": self.height, "width": self.width},
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
        }

    @classmethod
    def from_dict(cls, cfg: dict, default_size: int) -> "FrameSpec":
        size = cfg.get("size") or {}
        if isinstance(size, int):
            height = width = size
        elif "height" in size and "width" in size:
            height, width = int(size["height"]), int(size["width"])
        elif "shortest_edge" in size:
            height = width = int(size["shortest_edge"])
        else:
            height = width = default_size
        mean = tuple(float(x) for x in cfg.get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(x) for x in cfg.get("image_std", (0.5, 0.5, 0.5)))
        if not cfg.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        return cls(height, width, mean, std, int(cfg.get("resample", 3)), rescale)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, folder: str | Path, default_size: int) -> "FrameSpec":
        folder = Path(folder)
        for name in PREPROCESSOR_FILES:
            path = folder / name
            if path.is_file():
                return cls.from_dict(json.loads(path.read_text()), default_size)
        return cls(default_size, default_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def resize_frames(frames: np.ndarray, spec: FrameSpec) -> np.ndarray:
    """Resize uint8 frames [T, H, W, 3] to [T, spec.height, spec.width, 3] with PIL."""
    from PIL import Image

    if frames.shape[1:3] == (spec.height, spec.width):
        return frames
    out = np.empty((frames.shape[0], spec.height, spec.width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        img = Image.fromarray(frame).resize((spec.width, spec.height), resample=spec.resample)
        out[i] = np.asarray(img)
    return out


def preprocess_frames(frames: np.ndarray, spec: FrameSpec):
    """uint8 frames [T, H, W, 3] -> float32 torch tensor [T, 3, spec.height, spec.width]."""
    import torch

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {tuple(frames.shape)}")
    resized = resize_frames(frames, spec)
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).float() * spec.rescale_factor
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def patchify_video(video, temporal: int, patch: int, merge: int):
    """Qwen-VL's patches: normalised frames [F, C, H, W] -> (patches [steps·(H/p)·(W/p),
    C·temporal·p·p], grid [[steps, H/p, W/p]]) for patch side ``p``, in the order the vision
    tower takes: steps, then ``merge`` x ``merge`` groups of patches in raster order (each
    group's patches together), each patch as (C, t, p, p). An odd frame count repeats the last."""
    import torch

    f, c, h, w = video.shape
    if pad := -f % temporal:  # an odd count repeats the last frame
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
        f += pad
    gt, gh, gw = f // temporal, h // patch, w // patch
    x = video.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), torch.tensor([[gt, gh, gw]])
