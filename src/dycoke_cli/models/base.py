"""The family seam: what every model family provides, and what the pipeline gets back.

A *family* adapter (:class:`FamilyAdapter`) turns one architecture into the few things the
pipeline needs: encode frames into per-frame visual tokens, build the prompt around the video,
and expose the language model's decoder layers and head; :class:`LoadedModel` is a loaded
checkpoint described for the pipeline. Each family lives in a module of its own beside this one
(llava_onevision.py, qwen2_5_vl.py) and is listed in registry.py; this module imports none of
them. Finding, checking and loading a checkpoint is loader.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import DycokeError, ModelError
from ..options import FRAME_COVERAGE, Positions, Selection
from .checkpoint import check_loading_info, find_weights, read_json, show_json
from .preprocess import PREPROCESSOR_FILES, FrameSpec

# The paper's settings for real LLaVA-OneVision checkpoints (NOTES section 1); a checkpoint
# may override them with a dycoke.json of its own (the demo model does).
PAPER_DEFAULTS = {"num_frames": 32, "prune_layer": 3, "ttm_k": 0.7, "prune_p": 0.7, "positions": "contiguous"}
# Where we depart from the paper by default: decode-time selection keeps every frame in view
# (options.Selection, FRAME_COVERAGE); a checkpoint's dycoke.json may choose "topk".
PRODUCT_DEFAULTS = {"selection": "coverage", "frame_coverage": FRAME_COVERAGE}
CAPTION_PROMPT = "Describe this video in detail."
THINKING_SWITCH = "enable_thinking"  # the chat-template variable of Qwen3.5's (and Qwen3's) reasoning
EFFORT_SWITCH = "reasoning_effort"  # Qwen3.8's: "none" (off) or an effort ("low", "medium", "high")
DEFAULT_EFFORT = "medium"  # thinking on without an effort named, where the template takes one
DEFAULTS_FILE = "dycoke.json"
POSITION_MODES = tuple(p.value for p in Positions)
SELECTIONS = tuple(s.value for s in Selection)


@dataclass(frozen=True)
class ModelDefaults:
    num_frames: int = 32
    prune_layer: int = 3
    ttm_k: float = 0.7
    prune_p: float = 0.7
    positions: str = "contiguous"  # position ids of kept visual tokens (options.Positions)
    caption_prompt: str = CAPTION_PROMPT
    selection: str = "coverage"  # DyCoke's decode-time rule (options.Selection)
    frame_coverage: float = FRAME_COVERAGE
    # Frames by the clip's length (families that count frames: LLaVA-OV): round(seconds * fps)
    # within [min_frames, max_frames] (default num_frames); num_frames when fps is None or the
    # length is unknown. (The Qwen families read fps from their video preprocessor config.)
    fps: float | None = None
    min_frames: int = 1
    max_frames: int | None = None

    def frames_for(self, seconds: float | None) -> int:
        """The default frame count for a clip of ``seconds`` (see ``fps``)."""
        if self.fps is None or not seconds or seconds <= 0:
            return self.num_frames
        top = self.max_frames if self.max_frames is not None else self.num_frames
        return min(max(round(seconds * self.fps), self.min_frames), top)

    @classmethod
    def from_folder(cls, folder: Path, num_layers: int | None = None) -> "ModelDefaults":
        """The paper's defaults, overridden by the folder's dycoke.json if it has one.

        Every known key is checked (ModelError naming the file, the key and the valid range);
        ``num_layers`` (the language model's depth), when known, bounds prune_layer. Keys this
        version does not know are ignored, so a dycoke.json written for a later version loads.
        """
        path = folder / DEFAULTS_FILE
        values = {**PAPER_DEFAULTS, **PRODUCT_DEFAULTS}
        if path.is_file():
            data = read_json(path, "DyCoke defaults")
            values.update({k: v for k, v in data.items() if k in cls.__dataclass_fields__})
            for key in values.keys() & data.keys():
                valid = _default_is_valid(key, values[key], num_layers)
                if valid is not None:
                    raise ModelError(f"{path}: {key} must be {valid} (got {show_json(values[key])})")
            top = values.get("max_frames") or values.get("num_frames")
            if "min_frames" in data and isinstance(top, int) and values["min_frames"] > top:
                raise ModelError(f"{path}: min_frames must be at most max_frames (or num_frames) "
                                 f"({values['min_frames']} > {top})")
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def fps_defaults(folder: Path, defaults: ModelDefaults) -> ModelDefaults:
    """The defaults of a family that samples frames by fps: no frame count, unless the folder's
    dycoke.json names one."""
    path = folder / DEFAULTS_FILE
    if path.is_file() and "num_frames" in read_json(path, "DyCoke defaults"):
        return defaults
    return replace(defaults, num_frames=None)


def _default_is_valid(key: str, value, num_layers: int | None) -> str | None:
    """None if ``value`` is valid for the dycoke.json ``key``, else the valid range in words."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in ("num_frames", "min_frames", "max_frames"):
        return None if is_int and value >= 1 else "an integer >= 1"
    if key == "fps":
        return None if is_number and 0 < value <= 240 else "a number in (0, 240]"
    if key == "prune_layer":
        if num_layers is None:
            return None if is_int and value >= 1 else "an integer >= 1"
        ok = is_int and 1 <= value <= num_layers - 1
        return None if ok else f"an integer in [1, {num_layers - 1}] for this {num_layers}-layer model"
    if key in ("ttm_k", "prune_p"):
        return None if is_number and 0.0 <= value < 1.0 else "a number in [0, 1)"
    if key == "frame_coverage":
        return None if is_number and 0.0 <= value <= 1.0 else "a number in [0, 1]"
    if key == "selection":
        return None if value in SELECTIONS else f"one of {', '.join(SELECTIONS)}"
    if key == "positions":
        return None if value in POSITION_MODES else f"one of {', '.join(POSITION_MODES)}"
    if key == "caption_prompt":
        return None if isinstance(value, str) and value.strip() else "a non-empty string"
    return None


@dataclass
class LoadedModel:
    """A loaded video LLM and the facts derived from its checkpoint."""

    name: str
    path: Path
    family: str
    model: object  # the transformers model
    tokenizer: object
    frame_spec: FrameSpec
    tokens_per_frame: int  # visual tokens one frame contributes (after the family's pooling)
    video_token_id: int
    num_layers: int  # decoder layers of the language model
    hidden_size: int
    eos_token_ids: tuple[int, ...]
    defaults: ModelDefaults
    device: object
    dtype: object
    adapter: "FamilyAdapter" = field(repr=False, default=None)  # type: ignore[assignment]
    video_spec: object = None  # the family's own video preprocessing settings, if any
    text_per_step: int = 0  # text tokens a temporal step adds to the prompt (Qwen3-VL's timestamps)
    linear_layers: tuple[int, ...] = ()  # a hybrid stack's linear-attention layers: a fixed state, no keys

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers that attend over a KV cache (all of them but a hybrid stack's linear ones)."""
        return tuple(i for i in range(self.num_layers) if i not in self.linear_layers)

    def probe_layer(self, prune_from: int) -> int:
        """The layer whose attention chooses what layers ``>= prune_from`` see: the one before, or
        on a hybrid stack the last full-attention layer before (a linear layer has no attention)."""
        before = [i for i in self.attention_layers if i < prune_from]
        return before[-1] if before else prune_from - 1

    @property
    def fastv_layer(self) -> int:
        """FastV's first cut layer K: its paper's 2, or on a hybrid stack the layer after the first
        full-attention one (its probe)."""
        from ..options import FASTV_LAYER

        return self.attention_layers[0] + 1 if self.linear_layers else FASTV_LAYER

    # The calls the pipeline makes; they forward to the family adapter.
    @property
    def frames_per_step(self) -> int:
        """Frames one temporal step of visual tokens covers (Qwen2.5-VL: 2)."""
        return self.adapter.frames_per_step

    def default_frames(self, path) -> int:
        """Frames to sample from the clip at ``path`` when the user names no count."""
        return self.adapter.default_frames(self, path)

    def preprocess(self, frames, source: tuple[int, int] | None = None):
        """uint8 RGB frames [T, H, W, 3] -> what ``encode_video`` takes (frames first). ``source``:
        the clip's display (height, width), which sizes the result when the frames were decoded
        smaller (else their own size does)."""
        return self.adapter.preprocess(self, frames, source)

    def target_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the model resizes ``frames`` frames of that size to."""
        return self.adapter.target_size(self, frames, height, width)

    def token_grid(self, pixels) -> tuple[int, int]:
        """Rows and columns of one step's visual tokens for these preprocessed frames."""
        return self.adapter.token_grid(self, pixels)

    def encode_video(self, pixels):
        """Preprocessed frames -> (features [steps, N, D], newline [1, D] or None, DeepStack
        levels: a tuple of [steps, N, D], empty for a family without them)."""
        return self.adapter.encode_video(self, pixels)

    def video_part(self, enc, plan):
        """The prompt's video part for a token plan: (pieces in order, token ids [n] or vectors
        [n, D]; offsets of the visual tokens within the part [M]; the part's length)."""
        return self.adapter.video_part(self, enc, plan)

    def prompt_ids(self, question: str, system: str | None = None, thinking: bool | str | None = None):
        """Token ids before and after the video of the chat prompt for ``question`` (and a system
        message before it, if any). ``thinking``: on (True, or an effort: "low", "medium",
        "high") or off (False, None), as the template's ``enable_thinking`` and/or
        ``reasoning_effort`` take it; it changes only what comes after the question."""
        return self.adapter.prompt_ids(self, question, system, thinking)

    @property
    def has_thinking_switch(self) -> bool:
        """Whether the chat template takes ``enable_thinking`` (Qwen3.5, Qwen3) or
        ``reasoning_effort`` (Qwen3.8)."""
        return bool(self.thinking_switches(None))

    def thinking_switches(self, thinking: bool | str | None) -> dict:
        """The template variables that turn reasoning on or off (off unless asked), for the
        switches this chat template has."""
        template = getattr(self.tokenizer, "chat_template", None) or ""
        switches = {}
        if THINKING_SWITCH in template:
            switches[THINKING_SWITCH] = bool(thinking)
        if EFFORT_SWITCH in template:
            switches[EFFORT_SWITCH] = (thinking if isinstance(thinking, str) else DEFAULT_EFFORT) if thinking else "none"
        return switches

    def positions(self, span: tuple[int, int], kept, enc, seq: int, original: bool):
        return self.adapter.positions(self, span, kept, enc, seq, original)

    @property
    def decoder(self):
        return self.adapter.decoder(self)

    @property
    def lm_head(self):
        return self.adapter.lm_head(self)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "family": self.family,
            "layers": self.num_layers,
            "tokens_per_frame": self.tokens_per_frame,
            "image_size": [self.frame_spec.height, self.frame_spec.width],
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }


class FamilyAdapter:
    """What one model family must provide: loading, preprocessing, vision encoding, the prompt
    layout, position ids, and the language model's parts. See llava_onevision.py and
    qwen2_5_vl.py."""

    model_type: str
    frames_per_step: int = 1

    def model_class(self): ...  # the transformers class
    def wrap(self, model, tokenizer, *, name: str, path: Path | None = None, defaults=None, **settings): ...
    def folder_settings(self, folder: Path, model, defaults: "ModelDefaults") -> dict: ...
    def default_frames(self, lm: LoadedModel, path) -> int: ...
    def preprocess(self, lm: LoadedModel, frames, source: tuple[int, int] | None = None): ...
    def token_grid(self, lm: LoadedModel, pixels) -> tuple[int, int]: ...
    def encode_video(self, lm: LoadedModel, pixels): ...
    def positions(self, lm: LoadedModel, span: tuple[int, int], kept, enc, seq: int, original: bool): ...

    def load(self, name: str, folder: Path, device, dtype, allow_pickle: bool) -> LoadedModel:
        """Load a folder that ``check_folder`` has passed (``load_model`` sees to that)."""
        weights = find_weights(folder, allow_pickle)
        model, tokenizer = load_pretrained(self.model_class(), folder, dtype, allow_pickle,
                                           weights.label if weights else folder)
        model.to(device).eval()
        chat_template = _read_chat_template(folder, tokenizer)
        if not chat_template:
            raise ModelError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json)")
        tokenizer.chat_template = chat_template
        defaults = ModelDefaults.from_folder(folder, int(model.config.text_config.num_hidden_layers))
        return self.wrap(model, tokenizer, name=name, path=folder, **self.folder_settings(folder, model, defaults))

    def target_size(self, lm: LoadedModel, frames: int, height: int, width: int) -> tuple[int, int]:
        """A fixed frame size (LLaVA-OneVision); families that keep the aspect ratio override."""
        return lm.frame_spec.height, lm.frame_spec.width

    def video_part(self, lm: LoadedModel, enc, plan):
        """One block: the kept visual tokens, then the family's newline token (LLaVA-OV) if any,
        which the part's length leaves out (it is text for the pruner and for positions)."""
        import torch

        return [plan.tokens, enc.newline], torch.arange(plan.prefill_visual), plan.prefill_visual

    def prompt_ids(self, lm: LoadedModel, question: str, system: str | None = None,
                   thinking: bool | str | None = None):
        """Token ids before and after the single video placeholder of the chat prompt."""
        import torch

        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        switch = lm.thinking_switches(thinking)
        try:
            text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **switch)
        except Exception as exc:  # noqa: BLE001 - jinja2 syntax or runtime errors of the checkpoint's template
            raise ModelError(f"{lm.path}: the chat template fails ({_first_line(exc)})") from None
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        where = [i for i, t in enumerate(ids) if t == lm.video_token_id]
        if len(where) != 1:
            raise ModelError(f"{lm.path}: the chat template must place exactly one video token (found {len(where)})")
        i = where[0]
        return torch.tensor(ids[:i], dtype=torch.long), torch.tensor(ids[i + 1 :], dtype=torch.long)

    def decoder(self, lm: LoadedModel):
        return lm.model.model.language_model

    def lm_head(self, lm: LoadedModel):
        return lm.model.lm_head


def load_pretrained(model_class, folder: Path, dtype, allow_pickle: bool, weights_label: Path):
    """(model, tokenizer) through transformers; any failure of theirs is one ModelError.
    Pickles load with torch's safe loader only (weights_only=True); weights that do not
    match the config (names or shapes) are refused, not initialised at random. The text model
    gets the probing attention (compression/attention.py)."""
    from transformers import AutoTokenizer

    from ..compression.attention import ATTENTION_NAME, register_attention

    register_attention()
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(
                folder,
                dtype=dtype,
                use_safetensors=None if allow_pickle else True,
                weights_only=True,
                trust_remote_code=False,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported in ``info`` and refused below, with a clear message
                attn_implementation={"text_config": ATTENTION_NAME, "vision_config": "sdpa", "": "sdpa"},
            )
            check_loading_info(weights_label, info)
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except DycokeError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers, tokenizers and torch raise many types here
        if _is_out_of_memory(exc):
            raise  # the CLI turns it into advice on settings that need less memory
        raise ModelError(f"{folder}: cannot load the model ({_first_line(exc)})") from None
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def read_frame_spec(folder: Path, default_size: int) -> FrameSpec:
    """The checkpoint's frame preprocessing, or ModelError naming its file."""
    path = next((folder / n for n in PREPROCESSOR_FILES if (folder / n).is_file()), folder / PREPROCESSOR_FILES[0])
    try:
        spec = FrameSpec.from_pretrained(folder, default_size)
    except (ValueError, TypeError, KeyError, AttributeError, OSError, RecursionError) as exc:
        raise ModelError(f"{path}: unreadable preprocessor config ({type(exc).__name__})") from None
    sane = (spec.height >= 1 and spec.width >= 1 and len(spec.mean) == 3 and len(spec.std) == 3
            and all(math.isfinite(x) for x in (*spec.mean, *spec.std, spec.rescale_factor)) and all(spec.std))
    if not sane:
        raise ModelError(f"{path}: bad preprocessor config (size must be positive, image_mean and image_std "
                         "three finite numbers, image_std non-zero)")
    return spec


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No weight-loading progress bars or advisory warnings on our stderr while inside;
    transformers' own settings come back after (a library user keeps theirs)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _read_chat_template(folder: Path, tokenizer) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{jinja}: unreadable chat template ({type(exc).__name__})") from None
    js = folder / "chat_template.json"
    if js.is_file():
        return read_json(js, "chat template").get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        for x in source if isinstance(source, (list, tuple)) else [source]:
            if x is not None and int(x) not in ids:
                ids.append(int(x))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return tuple(ids)


