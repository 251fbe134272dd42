"""The decoding loop: prefill, one decoding step, and a generator of chosen tokens.

The language model is driven layer by layer through its public modules (embeddings are
built by the pipeline; rotary embeddings, decoder layers, final norm and head come from the
checkpoint), which lets a one-shot baseline drop hidden states mid-prefill and lets the
probing attention function see which layer it runs in. Batch size is 1 and nothing is padded,
so a mask is needed only for a prompt prefilled after a cached prefix (:func:`causal_after`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .compression.attention import probing
from .options import SamplingOptions


@dataclass
class DecodeTimings:
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)  # one per decoding step after the first token

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)


def sync(device) -> None:
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def run_layers(lm, embeds: torch.Tensor, positions: torch.Tensor, cache, selector=None,
               head: bool = True) -> torch.Tensor | None:
    """One forward pass of the language model over ``embeds`` [1, S, D] at ``positions`` [1, S]
    (or [3, 1, S] for M-RoPE).

    Returns the logits of the last position [1, V] (None with ``head=False``). ``selector`` (compression.selectors) sees
    its probed layer's attention; one that ``prunes == "prefill"`` also makes a prefill drop
    the unselected visual hidden states after that layer, for every later layer and step.
    """
    decoder = lm.decoder
    hidden = embeds
    cos, sin = decoder.rotary_emb(hidden, positions)
    mask = causal_after(cache.get_seq_length(), embeds.shape[1], embeds.device)
    flat_ids = positions if positions.dim() == 2 else None  # 3-D (M-RoPE) ids reach only the rotary
    cut_after = None
    if selector is not None and selector.prunes == "prefill" and embeds.shape[1] > 1:
        cut_after = selector.probe_layer
    with probing(selector):
        for i, layer in enumerate(decoder.layers):
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=flat_ids,
                           past_key_values=cache, use_cache=True)
            if i == cut_after:
                keep = selector.kept_positions(hidden.shape[1], hidden.device)
                hidden, positions = hidden[:, keep], positions[..., keep]
                cos, sin = cos[:, keep], sin[:, keep]
    if not head:
        return None  # only the cache was wanted (a prompt prefix)
    hidden = decoder.norm(hidden[:, -1:])
    return lm.lm_head(hidden)[:, -1].float()


def batch_positions(positions: torch.Tensor) -> torch.Tensor:
    """[S] -> [1, S]; M-RoPE's [3, S] -> [3, 1, S]."""
    return positions.unsqueeze(0) if positions.dim() == 1 else positions.unsqueeze(1)


def causal_after(past: int, n: int, device) -> torch.Tensor | None:
    """The attention mask of ``n`` new queries after ``past`` cached positions: query i sees
    the cache and new positions up to i ([1, 1, n, past + n], True = attend). None where no
    mask is needed: a whole prompt at once is plainly causal, one query sees everything. (SDPA's
    own is_causal aligns the triangle to the top left, wrong once a cache holds a prefix.)"""
    if past == 0 or n == 1:
        return None
    return torch.ones(n, past + n, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]


def choose_token(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0, else temperature + nucleus (top-p) sampling."""
    if opts.temperature <= 0:
        return int(logits.argmax(dim=-1))
    probs = torch.softmax(logits[0] / opts.temperature, dim=-1)
    if opts.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(0)
        cut = cumulative - sorted_probs > opts.top_p  # drop tokens once the mass before them exceeds p
        sorted_probs[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def generate_tokens(lm, embeds: torch.Tensor, cache, opts: SamplingOptions, selector=None,
                    timings: DecodeTimings | None = None, positions: torch.Tensor | None = None) -> Iterator[int]:
    """Prefill ``embeds`` [1, S, D], then yield token ids one by one until EOS or the limit.

    ``positions`` [S] (or [3, S]) are the prefill's position ids (default ``0..S-1``); generated
    tokens continue after the largest one. The EOS token itself is not yielded.
    """
    timings = timings if timings is not None else DecodeTimings()
    generator = None
    if opts.temperature > 0:
        generator = torch.Generator(device="cpu")
        if opts.seed is None:
            generator.seed()  # a fresh seed for this generator only; torch's global RNG is untouched
        else:
            generator.manual_seed(opts.seed)
    eos = set() if opts.ignore_eos else set(lm.eos_token_ids)
    seq = embeds.shape[1]
    embed_tokens = lm.decoder.embed_tokens
    with torch.inference_mode():
        t0 = time.perf_counter()
        if positions is None:
            positions = torch.arange(seq, device=embeds.device)
        positions = batch_positions(positions.to(embeds.device))
        next_position = int(positions.max()) + 1  # 3-D positions: the text goes on after the largest
        logits = run_layers(lm, embeds, positions, cache, selector)
        token = choose_token(logits.cpu(), opts, generator)
        sync(embeds.device)
        timings.prefill_s = time.perf_counter() - t0
        for step in range(opts.max_new_tokens):
            if token in eos:
                return
            yield token
            if step + 1 == opts.max_new_tokens:
                return
            t0 = time.perf_counter()
            pos = torch.tensor([[next_position + step]], device=embeds.device)
            x = embed_tokens(torch.tensor([[token]], device=embeds.device))
            logits = run_layers(lm, x, pos, cache, selector)
            token = choose_token(logits.cpu() if generator is not None else logits, opts, generator)
            timings.step_s.append(time.perf_counter() - t0)
