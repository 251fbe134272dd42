"""Build small checkpoints from configs: a word-level tokenizer, and a LLaVA-OneVision (SigLIP
vision tower + Qwen2 language model) or a Qwen2.5-VL, saved in the standard Hugging Face layout.

Used by the test suite (tiny random models), the demo-model training script and the
benchmark (full-size architecture, random weights). Nothing here downloads anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..models.preprocess import FrameSpec

# Special tokens of the word-level tokenizer; ids follow this order from 0.
PAD, UNK, IM_START, IM_END, IMAGE, VIDEO = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"
SPECIAL_TOKENS = (PAD, UNK, IM_START, IM_END, IMAGE, VIDEO)
# Words every chat needs (role names), always in the vocabulary right after the specials.
ROLE_WORDS = ("system", "user", "assistant")

# A ChatML template in the shape of LLaVA-OneVision's: the video placeholder comes first in
# the user turn, then the text. Words are separated by spaces (word-level tokenizer).
WORD_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|> ' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}{{ '<video> ' }}"
    "{% elif item['type'] == 'image' %}{{ '<image> ' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}{% endif %}"
)


# Qwen2.5-VL's vision tokens; its prompt wraps the video in start and end markers.
VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"
QWEN_SPECIAL_TOKENS = (PAD, UNK, IM_START, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)
QWEN_CHAT_TEMPLATE = WORD_CHAT_TEMPLATE.replace("'<video> '", f"'{VISION_START} {VIDEO_PAD} {VISION_END} '").replace(
    "'<image> '", f"'{VISION_START} {IMAGE_PAD} {VISION_END} '")


TIMESTAMP_WORDS = ("<", ">", ".", "seconds", *"0123456789")


def build_word_tokenizer(words: list[str], family: str = "llava_onevision"):
    """A PreTrainedTokenizerFast over the family's special tokens + ``words``: lowercase, split
    on spaces and punctuation. EOS is ``<|im_end|>``."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    qwen = family.startswith("qwen")
    timestamps = family.startswith("qwen3")  # "<1.5 seconds>": digits one by one, as Qwen's tokenizer
    specials = QWEN_SPECIAL_TOKENS if qwen else SPECIAL_TOKENS
    vocab: dict[str, int] = {}
    for w in (*specials, *ROLE_WORDS, *words, *(TIMESTAMP_WORDS if timestamps else ())):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    splits = [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    if timestamps:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.add_special_tokens(list(specials))
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=IM_END,
        bos_token=None,
        extra_special_tokens={"image_token": IMAGE_PAD if qwen else IMAGE, "video_token": VIDEO_PAD if qwen else VIDEO},
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE if qwen else WORD_CHAT_TEMPLATE
    return fast


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a small LLaVA-OneVision. Defaults give a model of well under 1 MB."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    max_position_embeddings: int = 4096
    # Config knobs left at transformers' defaults when None (the tiny test models); the
    # benchmark sets them to LLaVA-OV-0.5B's values.
    hidden_act: str | None = None  # vision tower
    layer_norm_eps: float | None = None  # vision tower
    rope_theta: float | None = None
    rms_norm_eps: float | None = None
    tie_word_embeddings: bool = False
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    extra: dict = field(default_factory=dict)


def build_llava_onevision(tokenizer, spec: TinySpec = TinySpec(), seed: int = 0, vocab_size: int | None = None,
                          *, dtype=None, device=None, attn_implementation=None):
    """A randomly initialised LlavaOnevisionForConditionalGeneration sized by ``spec``, in eval
    mode. With ``dtype`` or ``attn_implementation`` (e.g. the probing attention, registered by
    the caller) it is built through ``_from_config`` directly in that dtype; ``device`` moves it."""
    from transformers import LlavaOnevisionForConditionalGeneration

    config = llava_onevision_config(tokenizer, spec, vocab_size)
    return _instantiate(LlavaOnevisionForConditionalGeneration, config, tokenizer, seed, dtype, device,
                        attn_implementation)


def _instantiate(model_class, config, tokenizer, seed: int, dtype, device, attn_implementation):
    """A random ``model_class`` of ``config`` (seeded), in eval mode, with the tokenizer's ids."""
    import torch

    torch.manual_seed(seed)
    if dtype is None and attn_implementation is None:
        model = model_class(config)
    else:
        model = model_class._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if device is not None:
        model.to(device)
    model.eval()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    return model


def _optional(**knobs) -> dict:
    return {k: v for k, v in knobs.items() if v is not None}


def llava_onevision_config(tokenizer, spec: TinySpec = TinySpec(), vocab_size: int | None = None):
    """The LlavaOnevisionConfig of ``spec`` with ``tokenizer``'s special-token ids."""
    from transformers import LlavaOnevisionConfig

    rope = None if spec.rope_theta is None else {"rope_type": "default", "rope_theta": spec.rope_theta}
    tie = {"tie_word_embeddings": True} if spec.tie_word_embeddings else {}
    config = LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_intermediate,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            **_optional(hidden_act=spec.hidden_act, layer_norm_eps=spec.layer_norm_eps),
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size or len(tokenizer),
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_intermediate,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "max_position_embeddings": spec.max_position_embeddings,
            **_optional(rope_parameters=rope, rms_norm_eps=spec.rms_norm_eps),
            "tie_word_embeddings": spec.tie_word_embeddings,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
        },
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[spec.image_size, spec.image_size]],
        **tie,
        **spec.extra,
    )
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def save_checkpoint(model, tokenizer, folder: str | Path, spec: FrameSpec | None = None,
                    dycoke_defaults: dict | None = None) -> Path:
    """Write ``model`` + ``tokenizer`` + video preprocessor config (+ optional DyCoke defaults)
    in the Hugging Face layout that :func:`dycoke_cli.models.loader.load_model` reads."""
    size = model.config.vision_config.image_size
    spec = spec or FrameSpec(size, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return _save(model, tokenizer, folder, spec.to_dict(), dycoke_defaults)


def _save(model, tokenizer, folder: str | Path, preprocessor: dict, dycoke_defaults: dict | None) -> Path:
    """The Hugging Face layout: weights, tokenizer, chat template, video preprocessor config,
    and our dycoke.json when given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from ..models.base import quiet_transformers

    with quiet_transformers():
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(tokenizer.chat_template)
    (folder / "video_preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    if dycoke_defaults:
        (folder / "dycoke.json").write_text(json.dumps(dycoke_defaults, indent=2) + "\n")
    return folder


@dataclass(frozen=True)
class TinyQwenSpec:
    """Sizes of a small Qwen2.5-VL (a few hundred thousand parameters by default)."""

    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    window_size: int = 112  # pixels: 4 merged tokens a side
    fullatt_block_indexes: tuple[int, ...] = (1,)
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2
    max_position_embeddings: int = 4096
    tokens_per_second: int = 2
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112


def _vision_token_ids(tokenizer) -> dict[str, int]:
    """The Qwen families' config ids of their image and video tokens and vision start and end."""
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD), ("vision_start_token_id", VISION_START),
        ("vision_end_token_id", VISION_END))}


def build_qwen2_5_vl(tokenizer, spec: TinyQwenSpec = TinyQwenSpec(), seed: int = 0, vocab_size: int | None = None,
                     *, dtype=None, device=None, attn_implementation=None):
    """A randomly initialised Qwen2_5_VLForConditionalGeneration sized by ``spec``, in eval mode."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = _vision_token_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden, num_heads=spec.vision_heads,
                           intermediate_size=spec.vision_intermediate, out_hidden_size=spec.text_hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=spec.window_size,
                           fullatt_block_indexes=list(spec.fullatt_block_indexes),
                           tokens_per_second=spec.tokens_per_second, in_channels=3),
        text_config=dict(vocab_size=vocab_size or len(tokenizer), hidden_size=spec.text_hidden,
                         intermediate_size=spec.text_intermediate, num_hidden_layers=spec.text_layers,
                         num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
                         max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                                          "mrope_section": list(spec.mrope_section)},
                         use_sliding_window=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=spec.tie_word_embeddings),
        tie_word_embeddings=spec.tie_word_embeddings, **ids)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return _instantiate(Qwen2_5_VLForConditionalGeneration, config, tokenizer, seed, dtype, device,
                        attn_implementation)


def save_qwen_checkpoint(model, tokenizer, folder: str | Path, spec: TinyQwenSpec = TinyQwenSpec(),
                         dycoke_defaults: dict | None = None, fps: float = 2.0, min_frames: int = 2,
                         max_frames: int = 16) -> Path:
    """Write a Qwen2.5-VL ``model`` + ``tokenizer`` + chat template + video preprocessor config."""
    preprocessor = {"size": {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
                    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                    "temporal_patch_size": 2, "patch_size": 14, "merge_size": 2, "fps": fps,
                    "min_frames": min_frames, "max_frames": max_frames}
    return _save(model, tokenizer, folder, preprocessor, dycoke_defaults)


@dataclass(frozen=True)
class TinyQwen3Spec:
    """Sizes of a small Qwen3-VL, dense or MoE (a few hundred thousand parameters)."""

    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    num_position_embeddings: int = 16  # a 4 x 4 learned grid, resampled to each frame's
    deepstack_visual_indexes: tuple[int, ...] = (0, 1)
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    head_dim: int = 16
    text_intermediate: int = 128
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2
    max_position_embeddings: int = 4096
    rope_theta: float = 5_000_000.0
    tie_word_embeddings: bool = False
    moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate: int = 32
    min_pixels: int = 4 * 32 * 32  # summed over the clip's frames, as the processor counts
    max_pixels: int = 16 * 64 * 64


def build_qwen3_vl(tokenizer, spec: TinyQwen3Spec = TinyQwen3Spec(), seed: int = 0, vocab_size: int | None = None,
                   *, dtype=None, device=None, attn_implementation=None):
    """A randomly initialised Qwen3VLForConditionalGeneration (Qwen3VLMoe... with ``spec.moe``)."""
    import transformers

    ids = _vision_token_ids(tokenizer)
    text = dict(vocab_size=vocab_size or len(tokenizer), hidden_size=spec.text_hidden,
                intermediate_size=spec.text_intermediate, num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads, head_dim=spec.head_dim,
                max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                                 "mrope_section": list(spec.mrope_section), "mrope_interleaved": True},
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=spec.tie_word_embeddings)
    if spec.moe:
        text.update(num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                    moe_intermediate_size=spec.moe_intermediate, decoder_sparse_step=1)
    prefix = "Qwen3VLMoe" if spec.moe else "Qwen3VL"
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden, num_heads=spec.vision_heads,
                           intermediate_size=spec.vision_intermediate, out_hidden_size=spec.text_hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=spec.num_position_embeddings,
                           deepstack_visual_indexes=list(spec.deepstack_visual_indexes)),
        text_config=text, tie_word_embeddings=spec.tie_word_embeddings, **ids)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return _instantiate(getattr(transformers, f"{prefix}ForConditionalGeneration"), config, tokenizer, seed, dtype,
                        device, attn_implementation)


def save_qwen3_checkpoint(model, tokenizer, folder: str | Path, spec: TinyQwen3Spec = TinyQwen3Spec(),
                          dycoke_defaults: dict | None = None, fps: float = 2.0, min_frames: int = 2,
                          max_frames: int = 16) -> Path:
    """Write a Qwen3-VL ``model`` + ``tokenizer`` + chat template + video preprocessor config."""
    preprocessor = {"size": {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "temporal_patch_size": 2,
                    "patch_size": 16, "merge_size": 2, "fps": fps, "min_frames": min_frames, "max_frames": max_frames}
    return _save(model, tokenizer, folder, preprocessor, dycoke_defaults)


@dataclass(frozen=True)
class TinyQwen35Spec:
    """Sizes of a small Qwen3.5 (hybrid: Gated DeltaNet linear attention, full attention every
    ``full_attention_interval`` layers), dense or MoE with a shared expert."""

    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    num_position_embeddings: int = 16
    text_hidden: int = 64
    text_layers: int = 8  # full attention at 3 and 7
    full_attention_interval: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    head_dim: int = 32
    partial_rotary_factor: float = 0.5  # rotates 16 of 32 dims: 8 frequencies
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to the rotated dims / 2
    text_intermediate: int = 128
    linear_key_head_dim: int = 16
    linear_value_head_dim: int = 16
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    linear_conv_kernel_dim: int = 4
    max_position_embeddings: int = 4096
    rope_theta: float = 10_000_000.0
    tie_word_embeddings: bool = False
    moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate: int = 32
    shared_expert_intermediate: int = 32
    min_pixels: int = 4 * 32 * 32
    max_pixels: int = 16 * 64 * 64


def build_qwen3_5(tokenizer, spec: TinyQwen35Spec = TinyQwen35Spec(), seed: int = 0, vocab_size: int | None = None,
                  *, dtype=None, device=None, attn_implementation=None):
    """A randomly initialised Qwen3_5ForConditionalGeneration (Qwen3_5Moe... with ``spec.moe``)."""
    import transformers

    ids = _vision_token_ids(tokenizer)
    text = dict(vocab_size=vocab_size or len(tokenizer), hidden_size=spec.text_hidden,
                num_hidden_layers=spec.text_layers, full_attention_interval=spec.full_attention_interval,
                num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads, head_dim=spec.head_dim,
                linear_key_head_dim=spec.linear_key_head_dim, linear_value_head_dim=spec.linear_value_head_dim,
                linear_num_key_heads=spec.linear_num_key_heads, linear_num_value_heads=spec.linear_num_value_heads,
                linear_conv_kernel_dim=spec.linear_conv_kernel_dim,
                max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                                 "partial_rotary_factor": spec.partial_rotary_factor,
                                 "mrope_section": list(spec.mrope_section), "mrope_interleaved": True},
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=spec.tie_word_embeddings)
    if spec.moe:
        text.update(num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                    moe_intermediate_size=spec.moe_intermediate,
                    shared_expert_intermediate_size=spec.shared_expert_intermediate)
    else:
        text.update(intermediate_size=spec.text_intermediate)
    prefix = "Qwen3_5Moe" if spec.moe else "Qwen3_5"
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden, num_heads=spec.vision_heads,
                           intermediate_size=spec.vision_intermediate, out_hidden_size=spec.text_hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=spec.num_position_embeddings),
        text_config=text, tie_word_embeddings=spec.tie_word_embeddings, **ids)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return _instantiate(getattr(transformers, f"{prefix}ForConditionalGeneration"), config, tokenizer, seed, dtype,
                        device, attn_implementation)


# A Qwen3.5 checkpoint saves like a Qwen3-VL one (the same video processor).
save_qwen3_5_checkpoint = save_qwen3_checkpoint


def build_bpe_tokenizer(words: list[str]):
    """A small byte-level BPE tokenizer over Qwen's special tokens + ``words`` (each word one token
    after a space), the kind Qwen3.5's own tokenizer class rebuilds itself from: transformers loads
    a ``qwen3_5`` checkpoint's tokenizer as ``Qwen3_5Tokenizer`` whatever its files declare, and
    that class keeps only a BPE vocabulary and merges (a word-level vocabulary loses every word)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    vocabulary = (*ROLE_WORDS, *words, "seconds")
    text = " " + " ".join(vocabulary) + "\n" + "\n".join(vocabulary)  # " word" and a bare "word" (after a newline)
    trainer = trainers.BpeTrainer(vocab_size=100_000, special_tokens=list(QWEN_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=IM_END,
                                   bos_token=None, extra_special_tokens={"image_token": IMAGE_PAD,
                                                                         "video_token": VIDEO_PAD})
    from tokenizers import AddedToken

    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])  # as Qwen3.5's
    fast.chat_template = QWEN35_CHAT_TEMPLATE
    return fast


# ChatML as Qwen3.5's template writes it: newlines after the role, the video's three markers
# with nothing between them (the processor replaces the pad by the steps), and the reasoning
# switch: the answer starts inside <think> unless enable_thinking is false (an empty block).
QWEN35_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    f"{{% if item['type'] == 'video' %}}{{{{ '{VISION_START}{VIDEO_PAD}{VISION_END}' }}}}"
    f"{{% elif item['type'] == 'image' %}}{{{{ '{VISION_START}{IMAGE_PAD}{VISION_END}' }}}}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)
