"""Shared pieces of the demo-model training and evaluation scripts: the vocabulary, reading
clips at segment centres, packed (prefix-shared) forward passes and exact-match scoring."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dycoke_cli.toyworld.render import COLORS, MOTIONS, SHAPES  # noqa: E402

# Every word the demo model reads or writes (the tokenizer lowercases and splits "?" and ".").
WORDS = sorted(set(
    "what is in the video ? . , which way does move color colour at start end describe "
    "a an moves stays still and turns object thing it this".split()
    + list(SHAPES) + list(COLORS) + list(MOTIONS)
))


def read_clip(path: str | Path, num_frames: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: the frames nearest the centres of ``num_frames`` equal time
    segments of the clip (presentation time). Uses dycoke_cli.video.read_video when present."""
    try:
        from dycoke_cli.video.read import read_video  # the product's reader, once it exists
    except Exception:  # pragma: no cover - fallback while the product's reader is missing
        read_video = None
    if read_video is not None:
        return np.asarray(read_video(str(path), num_frames).frames)
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        frames, times = [], []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(frame.pts * tb)
    times = np.asarray(times)
    step = (times[1] - times[0]) if len(times) > 1 else 1 / 30
    duration = times[-1] - times[0] + step
    centres = times[0] + (np.arange(num_frames) + 0.5) * duration / num_frames
    idx = [int(np.argmin(np.abs(times - c))) for c in centres]
    return np.stack([frames[i] for i in idx])


class Packer:
    """Builds prefix-shared sequences: ``<|im_start|> user <video>*V`` once per clip, then
    each question-answer branch after it; every branch sees the prefix and itself only, with
    the positions it would have alone, so one forward pass gives exactly the single-question
    logits of every branch (checked against ``model(...)`` in ``check_packing``)."""

    def __init__(self, tokenizer, num_video_tokens: int, branch_len: int = 24):
        self.tok = tokenizer
        self.V = num_video_tokens
        video = tokenizer.convert_tokens_to_ids("<video>")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "QQQ"}]}],
            add_generation_prompt=True, tokenize=False)
        before, after = prompt.split("<video>")
        self.head = tokenizer(before, add_special_tokens=False)["input_ids"]
        self.q_before, self.q_after = after.split("QQQ")
        self.prefix = self.head + [video] * num_video_tokens
        self.P = len(self.prefix)
        self.B = branch_len
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id

    def branch(self, question: str, answer: str):
        """(ids, labels): labels are -100 except on the answer tokens and the final EOS."""
        q = self.tok(self.q_before + question + self.q_after, add_special_tokens=False)["input_ids"]
        a = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.eos]
        ids = q + a
        labels = [-100] * len(q) + a
        if len(ids) > self.B:
            raise ValueError(f"branch too long: {question!r} {answer!r}")
        pad = self.B - len(ids)
        return ids + [self.pad] * pad, labels + [-100] * pad

    def layout(self, k: int, prefix_len: int | None = None):
        """4D bool mask [1, 1, L, L] and position ids [1, L] for a prefix plus k branches
        (``prefix_len``: a prefix shortened by token compression)."""
        P = self.P if prefix_len is None else prefix_len
        return self._layout(k, P)

    def _layout(self, k: int, P: int):
        self_P = P
        L = self_P + k * self.B
        mask = torch.zeros(L, L, dtype=torch.bool)
        mask[: self_P, : self_P] = torch.tril(torch.ones(self_P, self_P, dtype=torch.bool))
        tri = torch.tril(torch.ones(self.B, self.B, dtype=torch.bool))
        pos = torch.empty(L, dtype=torch.long)
        pos[: self_P] = torch.arange(self_P)
        for j in range(k):
            s = self_P + j * self.B
            mask[s: s + self.B, : self_P] = True
            mask[s: s + self.B, s: s + self.B] = tri
            pos[s: s + self.B] = torch.arange(self_P, self_P + self.B)
        return mask[None, None], pos[None]


@dataclass(frozen=True)
class DecodePruning:
    """DyCoke's decode-time pruning as the product runs it (compression.selectors): layers
    >= ``layer`` keep ``floor((1 - p) * TTM's count)`` visual entries, chosen by layer
    ``layer - 1``'s head-averaged attention of the step's query (``coverage`` > 0: the product's
    BalancedTopk), re-selected when that row's cosine to the reference falls below
    ``threshold``."""

    p: float = 0.7
    layer: int = 3
    coverage: float = 0.5
    threshold: float = 0.9


def packed_logits(model, packer: Packer, pixel_values, branch_ids, return_features: bool = False,
                  ttm_k: float | None = None, prune: DecodePruning | None = None,
                  decoding: torch.Tensor | None = None):
    """pixel_values [N, T, 3, h, w]; branch_ids long [N, k, B]. Returns logits [N, k, B, vocab]
    for the branch positions (logit at position i predicts token i+1 of the branch; the
    first answer token is predicted from the last question position), and optionally the
    per-frame projected video features [N, T, n, D].

    ``prune`` (with ``ttm_k``): DyCoke's decode-time KV pruning, teacher-forced as the product
    decodes. The positions ``decoding`` marks (bool [N, k, B]: the answer tokens and the EOS,
    the queries of decoding steps) attend, in layers >= ``prune.layer``, only to the visual
    tokens the product's selector would keep at that step."""
    N, k, B = branch_ids.shape
    core = model.model
    out = core.get_video_features(pixel_values, vision_feature_layer=model.config.vision_feature_layer,
                                  vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    feats = out.pooler_output  # [N, V, D] (frames * tokens + newline)
    T = pixel_values.shape[1]
    per_frame = feats[:, :-1].reshape(N, T, -1, feats.shape[-1])
    video = feats
    if ttm_k:  # DyCoke's TTM, as the product applies it: kept tokens packed, positions contiguous
        from dycoke_cli.compression.ttm import temporal_merge

        merged = [temporal_merge(per_frame[i], ttm_k) for i in range(N)]
        kept, index = torch.stack([m[0] for m in merged]), merged[0][1]
        video = torch.cat([kept, feats[:, -1:]], dim=1)
    emb = core.get_input_embeddings()
    head = emb(torch.tensor(packer.head)).unsqueeze(0).expand(N, -1, -1)
    branches = emb(branch_ids.view(N, k * B))
    x = torch.cat([head, video.to(head.dtype), branches], dim=1)
    P = len(packer.head) + video.shape[1]
    mask, pos = packer.layout(k, P)
    if prune is None:
        h = core.language_model(inputs_embeds=x, attention_mask=mask, position_ids=pos.expand(N, -1)).last_hidden_state
    else:
        if not ttm_k:
            raise ValueError("decode pruning is DyCoke's second stage: it needs ttm_k")
        frame_of = index // per_frame.shape[2]  # every clip of a batch has the same TTM layout
        visual = slice(len(packer.head), len(packer.head) + len(frame_of))
        h = _pruned_forward(core.language_model, x, mask, pos.expand(N, -1), prune, decoding, visual, frame_of)
    logits = model.lm_head(h[:, P:, :]).view(N, k, B, -1)
    if return_features:
        return logits, per_frame
    return logits


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def _pruned_forward(lm, x, mask, pos, prune: DecodePruning, decoding, visual: slice, frame_of):
    """The Qwen2 language model over packed sequences x [N, L, D], layer by layer: layers
    before ``prune.layer`` with ``mask`` [1, 1, L, L]; from it on, the decoding positions of the
    branches (``decoding`` [N, k, B]; the branches fill the sequence's last k * B positions)
    see only their selection of the ``visual`` positions."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from dycoke_cli.compression.ttm import kept_per_frame

    N, L, _ = x.shape
    _, k, B = decoding.shape
    first = L - k * B
    keep = max(1, kept_per_frame(visual.stop - visual.start, prune.p))
    rot = lm.rotary_emb(x, pos)
    full, pruned = _additive(mask, x.dtype), None
    h = x
    for i, layer in enumerate(lm.layers):
        if i == prune.layer - 1:
            with torch.no_grad():  # the selection is a hard choice: no gradient through it
                attn = layer.self_attn
                hn = layer.input_layernorm(h)
                q = attn.q_proj(hn).view(N, L, -1, attn.head_dim).transpose(1, 2)
                key = attn.k_proj(hn).view(N, L, -1, attn.head_dim).transpose(1, 2)
                q, key = apply_rotary_pos_emb(q, key, *rot)
                key = key.repeat_interleave(q.shape[1] // key.shape[1], dim=1)  # grouped-query heads
                scores = (q[:, :, first:].float() @ key.float().transpose(-1, -2)) * attn.scaling
                rows = (scores + full[:, :, first:].float()).softmax(-1).mean(1)[..., visual]
                chosen = pruned_visual_mask(rows.reshape(N, k, B, -1), decoding, keep, frame_of,
                                            prune.coverage, prune.threshold)
                m = mask.expand(N, 1, L, L).clone()
                m[:, 0, first:, visual] &= chosen.reshape(N, k * B, -1)
                pruned = _additive(m, x.dtype)
        h = layer(h, attention_mask=full if i < prune.layer else pruned, position_ids=pos, position_embeddings=rot)
    return lm.norm(h)


def pruned_visual_mask(rows, decoding, keep: int, frame_of, coverage: float, threshold: float) -> torch.Tensor:
    """bool [N, k, B, V]: which visual entries each branch position sees under the product's
    rule. rows [N, k, B, V]: the probed attention over the visual entries; decoding [N, k, B]:
    the decoding steps (the other positions, the prefill, see everything). In each branch the
    first decoding step selects; a later one re-selects when cos(row, reference) < threshold
    (DecodeSelector.observe_row)."""
    from dycoke_cli.compression.selectors import BalancedTopk

    cand = BalancedTopk(keep, frame_of, coverage).chosen(rows)  # coverage 0: plain top-k
    out = torch.ones_like(cand)
    N, k, B, V = rows.shape
    sel = torch.zeros(N, k, V, dtype=torch.bool)
    ref = torch.zeros(N, k, V)
    has = torch.zeros(N, k, dtype=torch.bool)
    for t in range(B):
        on = decoding[..., t]
        sim = F.cosine_similarity(rows[:, :, t], ref, dim=-1)
        refresh = on & (~has | (sim < threshold))
        sel = torch.where(refresh[..., None], cand[:, :, t], sel)
        ref = torch.where(refresh[..., None], rows[:, :, t], ref)
        has = has | on
        out[:, :, t] = torch.where(on[..., None], sel, out[:, :, t])
    return out


def branch_targets(branch_labels: torch.Tensor) -> torch.Tensor:
    """Shift labels left by one within each branch: target[i] = label[i+1]."""
    t = torch.full_like(branch_labels, -100)
    t[..., :-1] = branch_labels[..., 1:]
    return t


def exact_match(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, k] bool: greedy decoding would produce exactly the answer and EOS (every
    teacher-forced argmax equals its target)."""
    pred = logits.argmax(-1)
    ok = (pred == targets) | (targets == -100)
    return ok.all(-1)


@torch.no_grad()
def check_packing(model, packer: Packer, tokenizer, pixel_values, question: str, answer: str) -> float:
    """Max abs difference between packed logits and a plain ``model(...)`` call."""
    ids, labels = packer.branch(question, answer)
    n = len([i for i in ids if i != packer.pad])
    full = torch.tensor([packer.prefix + ids[:n]])
    ref = model(input_ids=full, pixel_values_videos=pixel_values[:1]).logits[0, packer.P:]
    other, _ = packer.branch("describe the video .", "a red cup stays still")
    got = packed_logits(model, packer, pixel_values[:1], torch.tensor([[other, ids]]))[0, 1, :n]
    return float((ref - got).abs().max())
