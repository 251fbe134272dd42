"""Estimated language-model FLOPs of one answer, to compare compression methods.

For a decoder layer with hidden size d, H query heads and KV heads of width h_d, MLP width f:

    c     = 2 (d·H·h_d + 2·d·KV·h_d + H·h_d·d + 3·d·f)     linear FLOPs per token per layer
    a(n)  = 2·H·h_d·n·(n + 1)                               causal attention over n tokens
    prefill  = Σ_layers [ n_l · c + a(n_l) ]                n_l = tokens entering layer l
    decode   = Σ_steps Σ_layers [ c + 4·H·h_d·ctx_l(step) ]  ctx_l = keys layer l attends to
    head     = 2·d·V per produced token (prefill's last position and each step)

A hybrid stack's linear-attention layers (Qwen3.5's Gated DeltaNet: Hk key heads and Hv value
heads of widths d_k, d_v, a conv of width w) cost the same per token whatever came before:

    c_lin = 2 (d·(2·Hk·d_k + 2·Hv·d_v + 2·Hv) + Hv·d_v·d + 3·d·f) + 2·w·(2·Hk·d_k + Hv·d_v)
            + 8·Hv·d_k·d_v                                    projections, conv, the delta rule
    prefill and decode = n_l · c_lin, with no term that grows with the context

The vision tower is left out: every method shares it (the video is encoded once). The ratio
against the uncompressed run, for the same number of generated tokens, is the estimate shown
as "speedup"; measured times live in `dycoke compare` and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LMShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    linear: tuple[int, ...] = ()  # a hybrid stack's linear-attention layers
    linear_token: int = 0  # FLOPs per token of one of them (c_lin)

    @classmethod
    def from_config(cls, text_config) -> "LMShape":
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        kinds = getattr(text_config, "layer_types", None) or ()
        linear = tuple(i for i, kind in enumerate(kinds) if kind == "linear_attention")
        width = _mlp_width(text_config)
        return cls(text_config.num_hidden_layers, text_config.hidden_size, text_config.num_attention_heads,
                   text_config.num_key_value_heads, head_dim, width, text_config.vocab_size, linear,
                   _linear_token(text_config, width) if linear else 0)

    @property
    def linear_per_token(self) -> int:
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * (d * q + 2 * d * kv + q * d + 3 * d * self.intermediate)


def _mlp_width(text_config) -> int:
    """The MLP width a token passes through: ``intermediate_size``, or for a MoE stack without one
    (Qwen3.5-MoE) its active experts' plus the shared expert's."""
    width = getattr(text_config, "intermediate_size", None)
    if width:
        return int(width)
    def field(name: str) -> int:
        return int(getattr(text_config, name, 0) or 0)

    return field("moe_intermediate_size") * field("num_experts_per_tok") + field("shared_expert_intermediate_size")


def _linear_token(cfg, width: int) -> int:
    """c_lin of the module docstring, from a Qwen3.5 text config."""
    d = cfg.hidden_size
    keys = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    values = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    heads = cfg.linear_num_value_heads
    projections = 2 * (d * (2 * keys + 2 * values + 2 * heads) + values * d + 3 * d * width)
    conv = 2 * cfg.linear_conv_kernel_dim * (2 * keys + values)
    return projections + conv + 8 * heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim


def answer_flops(shape: LMShape, prefill_tokens: list[int], decode_context: list[int], generated: int) -> float:
    """FLOPs of one answer.

    prefill_tokens[l]: tokens entering layer l at prefill; decode_context[l]: keys layer l
    attends to at the first decoding step (each later step adds one); generated: tokens produced.
    """
    c, w = shape.linear_per_token, shape.heads * shape.head_dim
    steps = max(generated - 1, 0)  # the first token comes out of the prefill
    total = 0
    for i, (n, ctx) in enumerate(zip(prefill_tokens, decode_context)):
        if i in shape.linear:  # a linear-attention layer: a fixed cost per token
            total += (n + steps) * shape.linear_token
            continue
        # Σ_{s=0}^{steps-1} (c + 4 w (ctx + s))
        total += n * c + 2 * w * n * (n + 1) + steps * c + 4 * w * (steps * ctx + steps * (steps - 1) // 2)
    total += max(generated, 1) * 2 * shape.hidden * shape.vocab
    return float(total)


def plan_flops(shape: LMShape, plan, seq: int, total_visual: int, generated: int) -> tuple[float, float]:
    """FLOPs of an answer following ``plan`` (values.TokenPlan) with a ``seq``-token prefill,
    and the uncompressed run's FLOPs over these (the estimated speedup)."""
    generated = max(generated, 1)
    m = plan.prefill_visual
    full_seq = seq - m + total_visual
    base = answer_flops(shape, [full_seq] * shape.layers, [full_seq + 1] * shape.layers, generated)
    if plan.prune_from is None:
        prefill, ctx = [seq] * shape.layers, [seq + 1] * shape.layers
    else:
        reduced = seq - m + plan.keep
        cut = [i >= plan.prune_from for i in range(shape.layers)]
        prefill = [reduced if c and plan.prunes == "prefill" else seq for c in cut]
        ctx = [(reduced if c else seq) + 1 for c in cut]
    mine = answer_flops(shape, prefill, ctx, generated)
    return mine, base / mine
