"""What one static decoding step costs, counted on the CPU (issue 34, items 3 and 5): the
operations each decoder layer adds (the CUDA graph replays one kernel per non-view operation),
that the write indices and the attention masks are built once per step whatever the layer
count (and as memory-efficient SDPA takes them), and the bytes the pruned layers' buffers take
per step: the selected slot is rewritten only on a step whose probe took a new selection."""

from __future__ import annotations

from collections import Counter
from dataclasses import astuple

import pytest
import torch
from conftest import TINY_WORDS
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from dycoke_cli.compression.cache import PrunedKVCache
from dycoke_cli.compression.selectors import DecodeSelector
from dycoke_cli.decoding.loop import run_layers
from dycoke_cli.decoding.prompt import build_embeds
from dycoke_cli.decoding.static import StaticSteps
from dycoke_cli.models.loader import load_model

QUESTION = "what color is the cup?"
VIEWS = {"view", "reshape", "transpose", "slice", "unsqueeze", "select", "expand", "t", "alias", "_unsafe_view",
         "squeeze", "permute", "as_strided", "detach"}


@pytest.fixture(scope="module")
def six_layer_lm(tmp_path_factory):
    """The 4-layer tiny model's twin with 6 decoder layers (the same sizes otherwise)."""
    from dycoke_cli.testing.tiny import TinySpec, build_llava_onevision, build_word_tokenizer, save_checkpoint

    tok = build_word_tokenizer(TINY_WORDS)
    folder = save_checkpoint(build_llava_onevision(tok, TinySpec(text_layers=6), seed=0), tok,
                             tmp_path_factory.mktemp("six") / "model",
                             dycoke_defaults={"num_frames": 8, "prune_layer": 2})
    return load_model(str(folder), device="cpu", dtype="float32")


class _Ops(TorchDispatchMode):
    """Counts the operations that run (views excluded: they launch nothing)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _static_steps(lm, pruned: bool, keep: int = 9, seed: int = 0, threshold: float = 0.9):
    """A prompt of 8 random frames prefilled, then its static steps (DyCoke's pruned cache from
    layer 2, or a plain one): (steps, cache, selector, first token)."""
    torch.manual_seed(seed)
    visual = torch.randn(8 * lm.tokens_per_frame, lm.hidden_size)
    embeds, span = build_embeds(lm, QUESTION, visual, None)
    seq = embeds.shape[1]
    sel = DecodeSelector(prune_from=2, span=span, keep=keep, threshold=threshold) if pruned else None
    cache = PrunedKVCache(lm.num_layers, seq + 16, sel)
    with torch.inference_mode():
        token = run_layers(lm, embeds, torch.arange(seq)[None], cache, sel).argmax(dim=-1)
    return StaticSteps(lm, cache, sel, seq, 2, graph=False), cache, sel, token


def _one_step(lm, pruned: bool) -> tuple[Counter, Counter]:
    """(operations dispatched, profiler events) of the second static step (the first switches modes)."""
    steps, _, _, token = _static_steps(lm, pruned)
    with torch.inference_mode():
        steps(token)
        with _Ops() as ops, profile(activities=[ProfilerActivity.CPU]) as prof:
            steps(token)
    return ops.counts, Counter(event.name for event in prof.events())


# One decoder layer of Qwen2 in a decoding step, from its source: two RMSNorms (pow, mean, add
# eps, rsqrt, mul, mul by the weight, to float32 and back), q/k/v/o and the MLP's gate/up/down
# projections, rotary embedding of q and k (mul cos, rotate_half = neg + cat, mul sin, add),
# attention, two residual adds, silu * up, and the cache's write of the new key and value.
PER_LAYER = Counter({"linear": 7, "mul": 2 * 2 + 2 * 2 + 1, "add": 2 + 2 + 2, "to": 4, "pow": 2, "mean": 2,
                     "rsqrt": 2, "neg": 2, "cat": 2, "silu": 1, "scaled_dot_product_attention": 1,
                     "index_copy_": 2})


@pytest.mark.parametrize("pruned", [True, False], ids=["dycoke", "none"])
def test_each_layer_adds_only_its_own_work_to_a_static_step(tiny_lm, six_layer_lm, pruned):
    """Two more layers (both pruned under DyCoke) add exactly two layers' operations: the write
    index (steps + length) and the attention mask are made once per step, before the layers."""
    four, four_events = _one_step(tiny_lm, pruned)
    six, six_events = _one_step(six_layer_lm, pruned)
    assert six - four == PER_LAYER + PER_LAYER and four - six == Counter()
    # the step's own work, whatever the layer count: one write index per distinct length (the
    # plain layers', and under DyCoke the pruned layers'), the final norm's eps, DyCoke's probe
    # adding the mask to its scores; one mask per layer shape (a compare, a where: two under
    # DyCoke, the plain and the pruned layers), DyCoke's two in-place updates
    beyond = (four["add"] - 4 * PER_LAYER["add"], four["le"], four["where"])
    assert beyond == ((2 + 1 + 1, 2, 2 + 2) if pruned else (1 + 1, 1, 1))
    # SDPA is given a float mask: it converts nothing (a boolean mask costs two `where` per layer)
    assert six_events["aten::where"] == four_events["aten::where"]
    kernel = "aten::_scaled_dot_product_flash_attention_for_cpu"  # the profiler sees inside SDPA
    assert six_events[kernel] - four_events[kernel] == 2


class _Moved(TorchDispatchMode):
    """Bytes that data-movement operations write into the storage of ``target`` (a tensor), and
    read to do it: each element moved is read once and written once."""

    WRITES = {"index_select": lambda a, k: k.get("out"), "copy_": lambda a, k: a[0],
              "index_copy_": lambda a, k: a[3], "index_put_": lambda a, k: a[2]}

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.storage = target.untyped_storage().data_ptr()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        destination = args[0] if name.endswith("_") else kwargs.get("out")
        if name in self.WRITES and destination is not None and \
                destination.untyped_storage().data_ptr() == self.storage:
            moved = self.WRITES[name](args, kwargs)
            self.bytes += 2 * moved.numel() * moved.element_size()
        return func(*args, **kwargs)


def test_the_slot_is_rewritten_only_on_a_step_that_took_a_new_selection(tiny_lm):
    """The pruned layers' buffers take, per step, their new key and value, and the selected
    slot (every pruned layer's keep entries) only when the probe took a new selection: then it
    is read from the store and written once (two slot's bytes; gathering into a temporary and
    copying it in took four, at every step). Over the answer: at most 1.2 slot's bytes a step."""
    # this prompt's attention rows stay within cos 0.9999 of each other but once in 12 steps
    steps, cache, sel, token = _static_steps(tiny_lm, pruned=True, keep=9, seed=2, threshold=0.9999)
    block = cache.block
    pruned, element = block.work.shape[1], block.work.element_size()
    slot = block.work[..., block.slot, :].numel() * element
    kv_heads, head_dim = block.work.shape[3], block.work.shape[5]
    new_entries = 2 * 2 * pruned * kv_heads * head_dim * element  # a key and a value per layer, read and written
    per_step = []
    with torch.inference_mode():
        for _ in range(12):
            with _Moved(block.work) as moved:
                token = steps(token).argmax(dim=-1)
            per_step.append((moved.bytes, bool(sel.refreshed)))
    counts = sel.counts
    assert slot == 2 * pruned * kv_heads * 9 * head_dim * element
    assert [b for b, _ in per_step] == [new_entries + (2 * slot if fresh else 0) for _, fresh in per_step]
    assert sum(fresh for _, fresh in per_step) == counts.selections  # the first selection, then the refreshes
    assert (counts.steps, counts.selections) == (12, 2)  # the first selection and one refresh
    assert sum(b for b, _ in per_step) / 12 <= 1.2 * slot


@pytest.mark.parametrize("heads, kv_heads, dim", [(14, 2, 64), (28, 4, 128)], ids=["0.5b", "7b"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["f32", "bf16"])
def test_the_matmul_decode_attention_equals_sdpa(heads, kv_heads, dim, dtype, tol):
    """One query over a capacity of 300 keys, the first 257 in use, the heads of a group packed as
    transformers packs them for SDPA: the same output."""
    from dycoke_cli.compression.attention import matmul_decode_attention

    torch.manual_seed(0)
    query = torch.randn(1, heads, 1, dim, dtype=dtype)
    key, value = (torch.randn(1, kv_heads, 300, dim, dtype=dtype) for _ in range(2))
    used = torch.arange(300) <= 256
    mask = torch.where(used, 0.0, float("-inf")).to(dtype).view(1, 1, 1, -1)
    packed = query.reshape(1, kv_heads, heads // kv_heads, dim)
    want = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask)
    got = matmul_decode_attention(query, key, value, mask, dim**-0.5)
    assert got.shape == (1, 1, heads, dim)
    torch.testing.assert_close(got, want.reshape(1, 1, heads, dim), rtol=tol, atol=tol)
    # and the unused keys count for nothing: garbage there changes no output
    key[:, :, 257:], value[:, :, 257:] = 1e4, 1e4
    torch.testing.assert_close(matmul_decode_attention(query, key, value, mask, dim**-0.5), got, rtol=0, atol=0)


@pytest.mark.parametrize("pruned", [True, False], ids=["dycoke", "none"])
def test_the_matmul_kernel_gives_the_sdpa_steps(tiny_lm, monkeypatch, pruned):
    """Twelve static steps with each kernel: the same tokens, the same selections, and logits
    equal to float32 rounding at every step."""
    runs = {}
    for kernel in ("sdpa", "matmul"):
        monkeypatch.setenv("DYCOKE_DECODE_ATTENTION", kernel)
        steps, _, sel, token = _static_steps(tiny_lm, pruned, seed=2, threshold=0.9999)
        assert steps.attention == kernel
        logits, tokens = [], []
        with torch.inference_mode(), _Ops() as ops:
            for _ in range(12):
                logits.append(steps(token).clone())
                token = logits[-1].argmax(dim=-1)
                tokens.append(int(token))
        runs[kernel] = (tokens, torch.stack(logits), None if sel is None else sel.counts)
        matmul = kernel == "matmul"  # every layer of every step ran the chosen kernel
        assert (ops.counts["baddbmm"], ops.counts["scaled_dot_product_attention"]) == (48 * matmul, 48 * (not matmul))
    assert runs["matmul"][0] == runs["sdpa"][0] and runs["matmul"][2] == runs["sdpa"][2]
    torch.testing.assert_close(runs["matmul"][1], runs["sdpa"][1], rtol=1e-5, atol=1e-5)


def test_an_unknown_decode_kernel_is_a_usage_error():
    from dycoke_cli.decoding.static import decode_attention
    from dycoke_cli.errors import UsageError

    assert decode_attention({}) == "sdpa" and decode_attention({"DYCOKE_DECODE_ATTENTION": " matmul "}) == "matmul"
    with pytest.raises(UsageError, match=r"^DYCOKE_DECODE_ATTENTION must be sdpa or matmul \(got 'flash'\)$"):
        decode_attention({"DYCOKE_DECODE_ATTENTION": "flash"})


@pytest.mark.parametrize("method", ["dycoke", "none"])
def test_an_answer_with_the_matmul_kernel_equals_the_eager_one(tiny_lm, clip_path, monkeypatch, method):
    from dycoke_cli.options import CompressionOptions, Method, SamplingOptions
    from dycoke_cli.pipeline import answer, encode_video

    enc = encode_video(tiny_lm, clip_path, 8)
    opts = CompressionOptions(method=Method(method))
    eager = answer(tiny_lm, enc, QUESTION, opts, SamplingOptions(max_new_tokens=16, ignore_eos=True, decode="eager"))
    monkeypatch.setenv("DYCOKE_DECODE_ATTENTION", "matmul")
    static = answer(tiny_lm, enc, QUESTION, opts, SamplingOptions(max_new_tokens=16, ignore_eos=True, decode="static"))
    assert static.stats.decode_path == "static" and len(static.token_ids) == 16
    counts = [None if a.stats.selection is None else astuple(a.stats.selection)[:4] for a in (static, eager)]
    assert static.token_ids == eager.token_ids and counts[0] == counts[1]


def test_the_masks_are_what_memory_efficient_sdpa_takes_as_they_are(tiny_lm):
    """One mask per layer shape (DyCoke: the plain layers' and the pruned layers'), each at the
    start of its own buffer with rows of a multiple of 16 (the kernel checks a mask's address
    and strides; SDPA would pad a copy in every layer otherwise), 0 on the keys in use after
    this step's write and -inf on the rest."""
    steps, cache, sel, token = _static_steps(tiny_lm, pruned=True)
    with torch.inference_mode():
        steps(token)  # one step: the write index is now length + 1
        masks = cache.begin_step()
    assert len({mask.data_ptr() for mask in masks}) == 2
    for layer, mask in zip(cache.layers, masks):
        assert mask.shape == (1, 1, 1, layer.capacity) and mask.storage_offset() == 0
        assert mask.stride()[:3] == (mask.stride(0),) * 3 and mask.stride(0) % 16 == 0 and mask.stride(3) == 1
        in_use = layer.length + 2  # the prompt, the first step's key, this step's
        assert torch.equal(mask[0, 0, 0], torch.cat([torch.zeros(in_use), torch.full((layer.capacity - in_use,),
                                                                                      float("-inf"))]))
