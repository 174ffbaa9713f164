import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from workers.engine.detokenizer import DetokenizerDelta, IncrementalDetokenizer
from workers.sampling_params import SamplingParams

CORPUS = [
    "héllo wörld 日本 🙂",
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there",
    "STOP here ### and there",
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """A 300-token byte-level BPE: small enough that multi-byte characters split."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def stream(
    tok: PreTrainedTokenizerFast, ids: list[int], prompt: list[int] | None = None, **kw
) -> tuple[IncrementalDetokenizer, list[DetokenizerDelta]]:
    """Feeds ids one at a time until a stop string; returns every delta."""
    detok = IncrementalDetokenizer(tok, prompt or [], SamplingParams(**kw))
    deltas = []
    for token_id in ids:
        delta = detok.update([token_id])
        deltas.append(delta)
        if delta.stop_string is not None:
            break
    return detok, deltas


def joined(deltas: list[DetokenizerDelta]) -> str:
    return "".join(d.text for d in deltas)


@pytest.mark.parametrize("text", CORPUS + ["日本🙂日本", "a 🙂 b ö"])
def test_deltas_concatenate_to_full_decode(tok: PreTrainedTokenizerFast, text: str) -> None:
    ids = tok.encode(text)
    detok, deltas = stream(tok, ids, prompt=tok.encode("the prompt 日"))
    assert joined(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert detok.output_text == text
    assert all("\ufffd" not in d.text for d in deltas)
    assert all(d.stop_string is None for d in deltas)
    assert detok.flush() == DetokenizerDelta("", None)


def test_partial_utf8_held_until_complete(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("日本")
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the tokenizer really splits characters
    _, deltas = stream(tok, ids)
    texts = [d.text for d in deltas]
    # Nothing comes out until a character completes; then whole characters only.
    assert joined(deltas) == "日本"
    assert set(texts) <= {"", "日", "本", "日本"}
    assert texts[0] == ""


def test_token_spanning_character_boundary(tok: PreTrainedTokenizerFast) -> None:
    # "h\xc3" is one token: "h" must wait for the rest of "é" in the next token.
    ids = tok.encode("héllo")
    assert [tok.decode([i]) for i in ids] == ["h\ufffd", "\ufffdllo"]
    _, deltas = stream(tok, ids)
    assert [d.text for d in deltas] == ["", "héllo"]


def test_stop_string_truncates(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("hello world, hello there")
    detok, deltas = stream(tok, ids, stop=["world"])
    assert joined(deltas) == "hello " == detok.output_text
    assert deltas[-1].stop_string == "world"
    assert detok.stopped
    assert detok.flush() == DetokenizerDelta("", None)
    with pytest.raises(RuntimeError, match="after a stop string"):
        detok.update([1])


def test_include_stop_str_in_output(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("hello world, hello there")
    detok, deltas = stream(tok, ids, stop="world", include_stop_str_in_output=True)
    assert joined(deltas) == "hello world" == detok.output_text
    assert deltas[-1].stop_string == "world"


def test_stop_string_spanning_tokens(tok: PreTrainedTokenizerFast) -> None:
    text = "the quick brown fox jumps"
    ids = tok.encode(text)
    stop = "n fox j"
    assert all(stop not in tok.decode([i]) for i in ids)  # no single token holds it
    _, deltas = stream(tok, ids, stop=[stop])
    # " br", "ow", "n", " fo", "x", " ju": "n", "n fo", "n fox" wait as stop prefixes.
    assert [d.text for d in deltas][4:] == [" br", "ow", "", "", "", ""]
    assert joined(deltas) == "the quick brow"
    assert deltas[-1].stop_string == stop


def test_stop_string_inside_multibyte_text(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("héllo wörld 日本 🙂")
    detok, deltas = stream(tok, ids, stop=["本 "])
    assert joined(deltas) == "héllo wörld 日"
    assert deltas[-1].stop_string == "本 "


def test_held_back_prefix_released_when_not_a_stop(tok: PreTrainedTokenizerFast) -> None:
    text = "hello world, hello there"
    ids = tok.encode(text)
    assert [tok.decode([i]) for i in ids] == [
        "he", "llo", " w", "orld", ",", " he", "llo", " there"
    ]  # fmt: skip
    _, deltas = stream(tok, ids, stop=["hello there"])
    # "he", "hello" and later " he" → "he" could begin the stop: held until the next
    # token settles it. The first "hello" is real text and comes out with " w".
    assert [d.text for d in deltas] == ["", "", "hello w", "orld", ",", " ", "", ""]
    assert [d.stop_string for d in deltas] == [None] * 7 + ["hello there"]


def test_flush_releases_held_back_prefix(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("the quick brown fox jumps over the la")
    detok, deltas = stream(tok, ids, stop=["lazy"])
    assert joined(deltas) == "the quick brown fox jumps over the "
    assert detok.flush() == DetokenizerDelta("la", None)
    assert detok.output_text == "the quick brown fox jumps over the la"


def test_flush_releases_incomplete_character(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("ab 日")[:-1]  # the last byte of 日 never arrives
    detok, deltas = stream(tok, ids)
    expected = tok.decode(ids)
    assert expected.endswith("\ufffd")
    assert "\ufffd" not in joined(deltas)
    assert joined(deltas) + detok.flush().text == expected


def test_flush_honours_stop_completed_by_held_text(tok: PreTrainedTokenizerFast) -> None:
    # The token "h\xc3" completes the stop "e h" but ends mid-character, so its
    # text waits; if the request then ends, flush still finds the stop.
    ids = tok.encode("the ") + tok.encode("héllo")[:1]
    detok, deltas = stream(tok, ids, stop=["e h"])
    assert [d.text for d in deltas] == ["th", "", ""]
    assert not detok.stopped
    assert detok.flush() == DetokenizerDelta("", "e h")
    assert detok.output_text == "th" and detok.stopped


def test_earliest_stop_wins(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("STOP here ### and there")
    detok, deltas = stream(tok, ids, stop=["there", "###", "here ###"])
    assert joined(deltas) == "STOP "
    assert deltas[-1].stop_string == "here ###"


def test_multi_token_update_matches_single_steps(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("héllo wörld 日本 🙂 the quick brown fox")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["brown"]))
    out = []
    for i in range(0, len(ids), 3):
        out.append(detok.update(ids[i : i + 3]))
        if detok.stopped:
            break
    assert joined(out) == "héllo wörld 日本 🙂 the quick "
    assert out[-1].stop_string == "brown"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok: PreTrainedTokenizerFast, skip: bool) -> None:
    eos = tok.convert_tokens_to_ids("<eos>")
    ids = tok.encode("hello") + [eos] + tok.encode(" 日本")
    detok, deltas = stream(tok, ids, skip_special_tokens=skip)
    assert joined(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert joined(deltas) == ("hello 日本" if skip else "hello<eos> 日本")


def test_prompt_context_does_not_leak(tok: PreTrainedTokenizerFast) -> None:
    prompt = tok.encode("STOP here ### and 日")[:-1]  # prompt ends mid-character
    ids = tok.encode("the lazy dog")
    _, deltas = stream(tok, ids, prompt=prompt)
    assert joined(deltas) == "the lazy dog"


def test_output_starting_mid_character_after_partial_prompt(
    tok: PreTrainedTokenizerFast,
) -> None:
    # Raw-id prompts can split a character with the output: the output text is
    # still the decode of the output ids (stray bytes included), never a splice.
    whole = tok.encode("日本")
    prompt, ids = whole[:1], whole[1:]
    detok, deltas = stream(tok, ids, prompt=prompt)
    expected = tok.decode(ids)
    assert expected.startswith("\ufffd") and expected.endswith("本")
    assert joined(deltas) + detok.flush().text == expected


def test_random_tokens_fuzz(tok: PreTrainedTokenizerFast) -> None:
    """Random ids (invalid UTF-8, special tokens), random prompts and step sizes."""
    rng = random.Random(0)
    vocab = len(tok)
    stop_sets = [[], ["e"], ["o w", "日"], ["lo", "llo w"]]
    for trial in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        stops = stop_sets[trial % len(stop_sets)]
        include = trial % 3 == 0
        params = SamplingParams(stop=stops, include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tok, prompt, params)
        text, stop, i = "", None, 0
        while i < len(ids) and stop is None:
            step = rng.randrange(1, 4)
            delta = detok.update(ids[i : i + step])
            text, stop, i = text + delta.text, delta.stop_string, i + step
        if stop is None:
            tail = detok.flush()
            text, stop = text + tail.text, tail.stop_string
        full = tok.decode(ids, skip_special_tokens=True)
        assert text == detok.output_text
        if stop is None:
            assert text == full
            assert not any(s in full for s in stops)
        else:
            assert full.startswith(text if include else text + stop)
            assert text.endswith(stop) if include else True
            assert not any(s in (text[: -len(stop)] if include else text) for s in stops)
