"""Incremental detokenization: the pieces join to a whole decode, multi-byte characters split over tokens
included, with the byte tokenizer of the tiny models and a trained byte-level BPE; stop strings."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraforge.models import tiny_tokenizer
from loraforge.serve.text import MAX_HELD_TOKENS, IncrementalDecoder, TextStream

TEXTS = [
    "plain ASCII, with punctuation: a . b ! c?",
    "héllo wörld, ça va? naïve façade",
    "日本語のテキストと中文文本",
    "emoji 🎉🚀 and a family 👨‍👩‍👧 (ZWJ) and a flag 🇫🇷",
    "mixed: Ω≈ç√ ∑ — «quotes» 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
CORPUS = TEXTS * 20 + ["日本 日本語 語 本", "🎉🎉🎉 🚀🚀", "éé èè ëë", "the quick brown fox"] * 20


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE trained on ``CORPUS``: its merges make tokens that hold parts of characters."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture(params=["tiny", "byte-bpe"])
def tokenizer(request, byte_bpe):
    return tiny_tokenizer() if request.param == "tiny" else byte_bpe


def random_text(rng: random.Random, n: int) -> str:
    """``n`` characters from ASCII, Latin-1, CJK and emoji ranges: 1- to 4-byte UTF-8."""
    ranges = [(0x20, 0x7E), (0xC0, 0xFF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def decode_in_pieces(tokenizer, ids: list[int], rng: random.Random | None = None) -> list[str]:
    """The pieces an ``IncrementalDecoder`` releases for ``ids``, fed one token at a time (or in random
    chunks), then the flush."""
    decoder = IncrementalDecoder(tokenizer)
    pieces, at = [], 0
    while at < len(ids):
        step = rng.randint(1, 5) if rng else 1
        pieces.append(decoder.push(ids[at:at + step]))
        at += step
    return pieces + [decoder.flush()]


def test_a_byte_level_bpe_splits_characters_across_tokens(byte_bpe):
    """The premise of the BPE cases: some of its tokens decode to a partial character."""
    partial = [i for i in range(byte_bpe.vocab_size) if byte_bpe.decode([i]).endswith("\ufffd")]
    assert len(partial) > 128


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_whole_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces = decode_in_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in piece for piece in pieces)  # a split character is released whole


def test_random_text_in_random_chunks_with_special_tokens(tokenizer):
    rng = random.Random(0)
    for _ in range(30):
        ids = tokenizer.encode(random_text(rng, rng.randint(1, 60)))
        ids.insert(rng.randint(0, len(ids)), tokenizer.eos_token_id)  # skipped, as in a whole decode
        assert "".join(decode_in_pieces(tokenizer, ids, rng)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_undecodable_bytes_are_released_as_replacement_characters():
    tokenizer = tiny_tokenizer()
    ids = [0x80] * (3 * MAX_HELD_TOKENS) + list(b"ok") + [0xE6, 0x97]  # stray continuation bytes; a cut-off character
    pieces = decode_in_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == "\ufffd" * (3 * MAX_HELD_TOKENS) + "ok\ufffd"
    assert pieces[-1] == "\ufffd"  # the cut-off character waits for the flush


class CountingTokenizer:
    """Records how many ids each ``decode`` is given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sizes: list[int] = []

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kw)


@pytest.mark.parametrize("case", ["long-text", "undecodable-run"])
def test_each_token_costs_bounded_decoding_however_long_the_output(byte_bpe, case):
    """Every push decodes a window of bounded length, a bounded number of times: O(1) per token."""
    rng = random.Random(1)
    tokenizer = byte_bpe if case == "long-text" else tiny_tokenizer()
    text = random_text(rng, 3000 if case == "long-text" else 100)
    ids = tokenizer.encode(text) if case == "long-text" else [0x80] * 1000 + tokenizer.encode(text)
    counting = CountingTokenizer(tokenizer)
    decoder, pieces, work = IncrementalDecoder(counting), [], []
    for token in ids:
        before = len(counting.sizes)
        pieces.append(decoder.push([token]))
        work.append(sum(counting.sizes[before:]))
    assert "".join(pieces) + decoder.flush() == tokenizer.decode(ids)
    window = 2 * (MAX_HELD_TOKENS + 1)
    assert max(counting.sizes) <= window
    assert max(work) <= (MAX_HELD_TOKENS + 2) * window


def stream_until_stop(tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[str, bool]:
    stream, text = TextStream(tokenizer, stop), ""
    for token in ids:
        piece, stopped = stream.push([token])
        text += piece
        if stopped:
            return text, True
    piece, stopped = stream.flush()
    return text + piece, stopped


def test_stop_strings_cut_the_text_wherever_the_tokens_split_them(tokenizer):
    """Against the whole decode: the text ends just before the first stop string, which is never released."""
    rng = random.Random(2)
    for _ in range(40):
        text = random_text(rng, rng.randint(5, 40))
        start = rng.randrange(len(text) - 1)
        stops = (text[start:start + rng.randint(1, 3)], "never-in-the-output")
        ids = tokenizer.encode(text)
        whole = tokenizer.decode(ids)
        cut = min(i for i in (whole.find(s) for s in stops) if i >= 0)
        assert stream_until_stop(tokenizer, ids, stops) == (whole[:cut], True)


def test_a_held_back_stop_prefix_is_released_when_the_stop_does_not_follow():
    tokenizer = tiny_tokenizer()
    stream = TextStream(tokenizer, ("END",))
    assert stream.push(list(b"the E")) == ("the ", False)  # "E" may begin "END"
    assert stream.push(list(b"N")) == ("", False)
    assert stream.push(list(b"d")) == ("ENd", False)
    assert stream.push(list(b" EN")) == (" ", False)
    assert stream.flush() == ("EN", False)  # generation ended: nothing more can make it a stop string
