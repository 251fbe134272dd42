"""TextStream: incremental detokenisation over real tokenizers built offline.

Three decoders: byte-level BPE (Qwen2's kind: a character's bytes spread over several tokens),
a SentencePiece-style BPE with byte fallback (Llama's kind: the decode strips the leading space
of its first token) and the project's word-level tokenizer (a WordPiece decoder: spaces between
tokens, none before the first).
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dycoke_cli.decoding.detokenize import TextStream
from dycoke_cli.testing.tiny import IM_END, IM_START, UNK, VISION_START, build_word_tokenizer

CORPUS = [
    "The café in 東京 shows a 🎥 of a naïve cat.",
    "A person walks into the café and orders tea.",
    "The video shows a dog running in the park.",
    "naïve questions about 東京 are welcome.",
] * 3
ANSWER = "The café in 東京 shows a 🎥 of a naïve cat, then a dog runs in the park 界😀. "
FFFD = "\ufffd"


class CountingTokenizer(PreTrainedTokenizerFast):
    """The real tokenizer; it also records how many ids each decode call gets."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.decoded_lengths: list[int] = []

    def decode(self, token_ids, *args, **kwargs) -> str:
        self.decoded_lengths.append(len(token_ids))
        return super().decode(token_ids, *args, **kwargs)


def _byte_level() -> CountingTokenizer:
    """A tiny byte-level BPE (Qwen2's decoder), trained here, with <|vision_start|> added as special."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", IM_END])
    tok.train_from_iterator(CORPUS, trainer)
    fast = CountingTokenizer(tokenizer_object=tok, eos_token=IM_END, pad_token="<|endoftext|>")
    fast.add_tokens([AddedToken(VISION_START, special=True)], special_tokens=True)
    return fast


def _sentencepiece() -> CountingTokenizer:
    """A tiny Llama-style BPE: '▁' for spaces, byte fallback, the decode strips one leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    for b in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    return CountingTokenizer(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="</s>",
                             bos_token="<s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def byte_level() -> CountingTokenizer:
    return _byte_level()


@pytest.fixture(scope="module")
def sentencepiece() -> CountingTokenizer:
    return _sentencepiece()


def _deltas(tokenizer, ids: list[int]) -> tuple[list[str], str, TextStream]:
    """Every push's text, finish()'s text, and the stream."""
    stream = TextStream(tokenizer)
    pushed = [stream.push(i) for i in ids]
    return pushed, stream.finish(), stream


def _check_exact(tokenizer, ids: list[int]) -> list[str]:
    """The joined deltas are the whole decode, none holds U+FFFD; returns the push deltas."""
    pushed, tail, stream = _deltas(tokenizer, ids)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pushed) + tail == whole
    assert stream.text == whole and stream.ids == ids
    assert not any(FFFD in d for d in pushed) and tail == ""
    return pushed


@pytest.mark.parametrize("text", [ANSWER, "café 東京 🎥 naïve", "界😀", "ï", "  two  spaces 🎥🎥 東"])
def test_byte_level_stream_matches_the_whole_decode(byte_level: CountingTokenizer, text: str) -> None:
    _check_exact(byte_level, byte_level.encode(text))


def test_byte_level_character_comes_out_with_the_token_completing_it(byte_level: CountingTokenizer) -> None:
    ids = byte_level.encode("café 東京 🎥 naïve")
    assert byte_level.convert_ids_to_tokens(ids)[1:3] == ["fÃ", "©"]  # é is split over two tokens
    assert _check_exact(byte_level, ids) == ["ca", "", "fé", " 東京", " ", "", "", "", "🎥", " ", "naïve"]
    assert _check_exact(byte_level, byte_level.encode("界😀")) == ["", "", "界", "", "", "", "😀"]


def test_sentencepiece_leading_space_survives_the_window(sentencepiece: CountingTokenizer) -> None:
    ids = sentencepiece.encode("界 😀 park")
    assert sentencepiece.decode(ids[4:]) == "😀 park"  # a decode from '▁' drops the space
    assert _check_exact(sentencepiece, ids) == ["", "", "", "界", " ", "", "", "", "😀", " par", "k"]
    assert _check_exact(sentencepiece, sentencepiece.encode("The café in 東京")) == ["The", " café", " in", " 東京"]
    _check_exact(sentencepiece, sentencepiece.encode(ANSWER))


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_word_tokenizer_spaces_and_special_tokens(family: str) -> None:
    tok = build_word_tokenizer(["the", "man", "walks", ",", "then", "sits", "."], family=family)
    ids = tok.encode("the man walks , then sits .", add_special_tokens=False)
    assert _check_exact(tok, ids) == ["the", " man", " walks", ",", " then", " sits", "."]
    special = [tok.convert_tokens_to_ids(t) for t in (IM_START, UNK, IM_END)]
    with_specials = [special[0], *ids[:2], special[1], *ids[2:], special[2]]
    assert _check_exact(tok, with_specials) == ["", "the", " man", "", " walks", ",", " then", " sits", ".", ""]


def test_qwen_vision_marker_is_skipped_though_not_in_all_special_ids() -> None:
    tok = build_word_tokenizer(["the", "man", "walks"], family="qwen2_5_vl")
    marker = tok.convert_tokens_to_ids(VISION_START)
    assert marker not in tok.all_special_ids
    ids = [*tok.encode("the man", add_special_tokens=False), marker, *tok.encode("walks", add_special_tokens=False)]
    assert _check_exact(tok, ids) == ["the", " man", "", " walks"]


def test_byte_level_special_tokens_are_skipped(byte_level: CountingTokenizer) -> None:
    ids = byte_level.encode("café 東京")
    marker, eos = byte_level.convert_tokens_to_ids(VISION_START), byte_level.eos_token_id
    assert marker not in byte_level.all_special_ids
    # Inside a character split over two tokens: the whole decode drops them and joins the bytes.
    mixed = [ids[0], ids[1], marker, eos, ids[2], *ids[3:], eos]
    assert _check_exact(byte_level, mixed) == ["ca", "", "", "", "fé", " 東京", ""]
    assert byte_level.decode(mixed, skip_special_tokens=True) == "café 東京"


def test_finish_releases_an_unfinished_character(byte_level: CountingTokenizer) -> None:
    ids = byte_level.encode("café")[:2]
    pushed, tail, stream = _deltas(byte_level, ids)
    assert pushed == ["ca", ""] and tail == "f" + FFFD
    assert stream.text == byte_level.decode(ids, skip_special_tokens=True) == "caf" + FFFD


def test_empty_and_specials_only_streams(byte_level: CountingTokenizer) -> None:
    assert TextStream(byte_level).finish() == ""
    pushed, tail, stream = _deltas(byte_level, [byte_level.eos_token_id] * 3)
    assert pushed == ["", "", ""] and tail == "" and stream.text == "" and len(stream.ids) == 3


@pytest.mark.parametrize("seed", range(4))
def test_byte_level_random_ids_still_join_to_the_whole_decode(byte_level: CountingTokenizer, seed: int) -> None:
    """Any ids, invalid byte sequences and specials included: the stream never differs from the decode."""
    rng = random.Random(seed)
    ids = [rng.randrange(len(byte_level)) for _ in range(400)]
    pushed, tail, stream = _deltas(byte_level, ids)
    assert "".join(pushed) + tail == stream.text == byte_level.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("build", [_byte_level, _sentencepiece])
def test_each_decode_sees_a_bounded_window(build) -> None:
    """A 2000-token answer: no decode sees more than a few dozen ids (the old stream decoded them all)."""
    tok = build()
    ids = (tok.encode(ANSWER) * 200)[:2000]
    assert len(ids) == 2000
    tok.decoded_lengths.clear()
    pushed, tail, _ = _deltas(tok, ids)
    assert "".join(pushed) + tail == tok.decode(ids, skip_special_tokens=True)
    lengths = tok.decoded_lengths[:-1]  # the last one is the check's whole decode
    assert max(lengths) <= 12
    assert sum(lengths) < 20 * len(ids)


def test_a_run_of_special_tokens_keeps_the_window_small(byte_level: CountingTokenizer) -> None:
    """Specials add no text; kept in the window they would pile up there, held back with it."""
    marker, eos = byte_level.convert_tokens_to_ids(VISION_START), byte_level.eos_token_id
    ids = [*byte_level.encode("the café"), *[marker, eos] * 500, *byte_level.encode(" 東京 🎥")]
    byte_level.decoded_lengths.clear()
    assert _check_exact(byte_level, ids)[-6:] == [" 東京", " ", "", "", "", "🎥"]
    assert max(byte_level.decoded_lengths[:-1]) <= 12
