"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, model_type ``llava_onevision``):
SigLIP over each frame at the checkpoint's image size, a projector, 2x2 bilinear pooling of the
patch grid (196 tokens a frame at 384 px), one ``image_newline`` token after the whole video,
and 1-D positions."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ModelError
from .base import FamilyAdapter, LoadedModel, ModelDefaults, eos_ids, read_frame_spec
from .preprocess import FrameSpec, preprocess_frames


class LlavaOneVisionAdapter(FamilyAdapter):
    model_type = "llava_onevision"

    def model_class(self):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def folder_settings(self, folder, model, defaults):
        return {"defaults": defaults, "frame_spec": read_frame_spec(folder, model.config.vision_config.image_size)}

    def wrap(self, model, tokenizer, *, name: str, path: Path | None = None, frame_spec: FrameSpec | None = None,
             defaults: ModelDefaults | None = None) -> LoadedModel:
        """Describe an already-built model (the benchmark builds one in memory from a config).

        The text model must use the probing attention: build it with
        ``attn_implementation={"text_config": ATTENTION_NAME, "vision_config": "sdpa", "": "sdpa"}``
        after ``register_attention()``, or call ``model.set_attn_implementation`` likewise.
        """
        config = model.config
        text = config.text_config
        if "sliding_attention" in (getattr(text, "layer_types", None) or []):
            raise ModelError(f"{path or name}: sliding-window attention layers are not supported")
        vision = config.vision_config
        grid = vision.image_size // vision.patch_size
        tokens_per_frame = math.ceil(grid / 2) ** 2  # 2x2 bilinear pooling of the patch grid
        param = next(model.parameters())
        return LoadedModel(
            name=name,
            path=Path(path) if path is not None else Path(name),
            family=self.model_type,
            model=model,
            tokenizer=tokenizer,
            frame_spec=frame_spec or FrameSpec(vision.image_size, vision.image_size, (0.5,) * 3, (0.5,) * 3),
            tokens_per_frame=tokens_per_frame,
            video_token_id=int(config.video_token_id),
            num_layers=int(text.num_hidden_layers),
            hidden_size=int(text.hidden_size),
            eos_token_ids=eos_ids(model, tokenizer),
            defaults=defaults or ModelDefaults(),
            device=param.device,
            dtype=param.dtype,
            adapter=self,
        )

    def default_frames(self, lm, info, fps=None, max_frames=None):
        """dycoke.json's ``num_frames``, or with an fps (its ``fps``, or the user's) the clip's
        length times fps (ModelDefaults.frames_for)."""
        return lm.defaults.frames_for(info.duration if info is not None else None, fps, max_frames)

    def time_instruction(self, lm, duration, timestamps):
        """LLaVA-Video's time instruction, as lmms-eval's ``llava_vid`` writes it (the clip's
        length and each sampled frame's time, two decimals; no space after the list's full stop)."""
        times = ",".join(f"{t:.2f}s" for t in timestamps)
        return (f"The video lasts for {duration or 0.0:.2f} seconds, and {len(timestamps)} frames are uniformly "
                f"sampled from it. These frames are located at {times}.Please answer the following questions "
                f"related to this video.")

    def preprocess(self, lm, frames, source=None, count=None):
        return preprocess_frames(frames, lm.frame_spec)

    def token_grid(self, lm, pixels):
        side = math.isqrt(lm.tokens_per_frame)  # the pooled patch grid is square
        return side, side

    def encode_video(self, lm, pixels):
        """pixels [T, 3, h, w] -> (features [T, N, D], newline [1, D], no DeepStack levels) in the
        model's dtype."""
        import torch

        with torch.inference_mode():
            out = lm.model.model.get_video_features(
                pixels.unsqueeze(0).to(lm.device, lm.dtype), return_dict=True
            ).pooler_output[0]
        t = pixels.shape[0]
        n = lm.tokens_per_frame
        if out.shape[0] != t * n + 1:
            raise ModelError(f"{lm.path}: vision tower gave {out.shape[0]} tokens, expected {t * n + 1}")
        return out[:-1].reshape(t, n, -1), out[-1:], ()

    def positions(self, lm, span, kept, enc, seq, original):
        """Position ids [S] of a prefill whose visual span holds the tokens at flat indices
        ``kept`` [M] of ``total_visual``; None means contiguous ``0..S-1`` (what the paper does
        after merging, and what an uncompressed prompt is). ``original``: each kept visual token
        at ``start + its flat index``, and the text after the video where it would be without
        compression. (1-D positions: a family with 3-D ones returns [3, S].)"""
        import torch

        total_visual = enc.visual_tokens
        if not original or kept.shape[0] == total_visual:
            return None
        start, end = span
        after = torch.arange(start + total_visual, start + total_visual + seq - end)
        return torch.cat([torch.arange(start), kept.cpu() + start, after])
