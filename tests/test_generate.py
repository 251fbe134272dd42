import pytest
import torch

from dycoke_cli.models.preprocess import preprocess_frames
from dycoke_cli.options import CompressionOptions, Method, SamplingOptions
from dycoke_cli.pipeline import answer, encode_video

QUESTION = "what color is the cup?"


@pytest.fixture(scope="module")
def encoded(tiny_lm, clip_path):
    return encode_video(tiny_lm, clip_path, 8)


def generate_reference(lm, enc, question, max_new_tokens):
    """transformers' own generate on the same frames, with the video tokens expanded."""
    before, after = lm.prompt_ids(question)
    n_video = enc.frames * enc.tokens_per_frame + 1
    ids = torch.cat([before, torch.full((n_video,), lm.video_token_id), after]).unsqueeze(0)
    pixels = preprocess_frames(enc.video.frames, lm.frame_spec).unsqueeze(0)
    out = lm.model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=max_new_tokens,
                            do_sample=False, attention_mask=torch.ones_like(ids))
    tokens = out[0, ids.shape[1]:].tolist()
    return [t for t in tokens if t not in lm.eos_token_ids][: len(tokens)]


@pytest.mark.parametrize("question", [QUESTION, "describe the video.", "which way does the ball move"])
def test_uncompressed_loop_equals_model_generate(tiny_lm, encoded, question):
    want = generate_reference(tiny_lm, encoded, question, 16)
    got = answer(tiny_lm, encoded, question, CompressionOptions(method=Method.none), SamplingOptions(max_new_tokens=16))
    assert list(got.token_ids) == want
    assert len(want) == 16


def test_dycoke_with_k0_p0_equals_uncompressed(tiny_lm, encoded):
    none = answer(tiny_lm, encoded, QUESTION, CompressionOptions(method=Method.none), SamplingOptions(max_new_tokens=16))
    same = answer(tiny_lm, encoded, QUESTION, CompressionOptions(method=Method.dycoke, ttm_k=0.0, prune_p=0.0),
                  SamplingOptions(max_new_tokens=16))
    assert same.token_ids == none.token_ids
    assert same.stats.visual_tokens_prefill == same.stats.visual_tokens == 32
    assert same.stats.selection.selections == 1


def test_dycoke_defaults_stats(tiny_lm, encoded):
    r = answer(tiny_lm, encoded, QUESTION, CompressionOptions(), SamplingOptions(max_new_tokens=8))
    s = r.stats.to_dict()
    # 8 frames x 4 tokens, k = 0.7: anchors keep 4, the 6 others floor(0.3 * 4) = 1 each
    assert (s["visual_tokens"], s["visual_tokens_prefill"]) == (32, 14)
    assert s["visual_tokens_decode"] == 4  # floor(0.3 * 14)
    assert s["prefill_retention"] == 14 / 32
    assert s["overall_retention"] == 4 / 32
    assert s["prune_layer"] == 2  # the checkpoint's own default (dycoke.json)
    assert s["tokens_generated"] == len(r.token_ids) == 8
    assert s["steps"] == 7 and s["selections"] >= 1
    assert s["flops_ratio_estimate"] > 1.0


@pytest.mark.parametrize("method,prefill,decode_", [
    (Method.fastv, 32, 4), (Method.random, 4, 4), (Method.frames, 4, 4), (Method.none, 32, 32)])
def test_baselines_use_the_same_budget(tiny_lm, encoded, method, prefill, decode_):
    r = answer(tiny_lm, encoded, QUESTION, CompressionOptions(method=method), SamplingOptions(max_new_tokens=4))
    assert (r.stats.visual_tokens_prefill, r.stats.visual_tokens_decode) == (prefill, decode_)
    assert r.method == method.value


def test_sampling_is_reproducible_with_a_seed(tiny_lm, encoded):
    opts = SamplingOptions(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    a = answer(tiny_lm, encoded, QUESTION, CompressionOptions(method=Method.none), opts)
    b = answer(tiny_lm, encoded, QUESTION, CompressionOptions(method=Method.none), opts)
    greedy = answer(tiny_lm, encoded, QUESTION, CompressionOptions(method=Method.none), SamplingOptions(max_new_tokens=12))
    assert a.token_ids == b.token_ids
    assert a.token_ids != greedy.token_ids


def test_prune_layer_is_validated_against_depth(tiny_lm, encoded):
    from dycoke_cli.errors import UsageError

    with pytest.raises(UsageError, match=r"^prune_layer must be in \[1, 3\] for this 4-layer model \(got 4\)"):
        answer(tiny_lm, encoded, QUESTION, CompressionOptions(prune_layer=4), SamplingOptions())


def test_kv_bytes_held(tiny_lm, encoded):
    r = answer(tiny_lm, encoded, QUESTION, CompressionOptions(offload_pruned=True), SamplingOptions(max_new_tokens=8))
    s = r.stats.to_dict()
    seq, fed = s["prefill_tokens"], s["tokens_generated"] - 1  # the last token is never fed back
    per_token_layer = 2 * 2 * 16 * 4  # k and v, 2 KV heads, head_dim 16, fp32
    full_layers, pruned_layers = 2, 2  # prune_layer 2 of 4
    assert s["kv_bytes"] == {
        "working": per_token_layer * (full_layers * (seq + fed) + pruned_layers * (seq - 14 + 4 + fed)),
        "store": per_token_layer * pruned_layers * 14,
        "store_on_host": True,
        "device_total": per_token_layer * (full_layers * (seq + fed) + pruned_layers * (seq - 14 + 4 + fed)),
        "saved_on_device": 0,  # a CPU run: nothing to take off an accelerator
        "moved_to_device": 0,  # nor anything copied back onto one
        "linear_state": 0,  # no linear-attention layers (a hybrid stack's states)
    }


def test_original_positions_keep_each_token_where_it_was(tiny_lm, encoded):
    from dycoke_cli.compression.baselines import plan_tokens
    from dycoke_cli.decoding.prompt import build_embeds, prefill_positions

    plan = plan_tokens(encoded, CompressionOptions().resolve(tiny_lm))
    embeds, span = build_embeds(tiny_lm, QUESTION, plan.tokens, encoded.newline)
    # "<|im_start|> user" | 14 kept of 32 visual | newline, 6 question tokens, 3 closing tokens
    assert (span, embeds.shape[1]) == ((2, 16), 26)
    positions = prefill_positions(tiny_lm, span, plan, encoded, 26, "original")
    assert positions.tolist() == [0, 1, *(2 + i for i in plan.index.tolist()), *range(34, 44)]
    assert prefill_positions(tiny_lm, span, plan, encoded, 26, "contiguous") is None
    full = plan_tokens(encoded, CompressionOptions(method=Method.none).resolve(tiny_lm))
    assert prefill_positions(tiny_lm, (2, 34), full, encoded, 44, "original") is None


def test_original_positions_change_the_answer_only_when_tokens_were_dropped(tiny_lm, encoded):
    opts = SamplingOptions(max_new_tokens=10)
    plain = answer(tiny_lm, encoded, QUESTION, CompressionOptions(method=Method.none), opts)
    same = answer(tiny_lm, encoded, QUESTION, CompressionOptions(method=Method.none, positions="original"), opts)
    assert same.token_ids == plain.token_ids
    with pytest.raises(Exception, match=r"positions must be one of contiguous, original \(got 'sideways'\)"):
        answer(tiny_lm, encoded, QUESTION, CompressionOptions(positions="sideways"), opts)
