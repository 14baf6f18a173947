import pytest
from tiny_models import tiny_tokenizer

from batchdecode.detokenizer import IncrementalDetokenizer, decode_completion

PROMPT = "Tell me something:"
TEXTS = ["Once upon a time there was a little fox.", "café, naïve, 日本語 — 🦊 done", "def add(a, b):\n    return a + b"]


def feed(detok, ids):
    for i, token_id in enumerate(ids):
        if detok.append(token_id):
            return i
    return None


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_decoding_at_once(text):
    tok = tiny_tokenizer()
    prompt_ids, ids = tok.encode(PROMPT), tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt_ids, [])
    assert feed(detok, ids) is None
    assert detok.text == text == decode_completion(tok, prompt_ids, ids)


def test_multibyte_characters_wait_for_their_last_byte():
    tok = tiny_tokenizer()
    ids = tok.encode("日本")               # byte-level BPE: several tokens per character
    assert len(ids) > 2
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), [])
    seen = []
    for token_id in ids:
        detok.append(token_id)
        seen.append(detok.text)
    assert all("\ufffd" not in t for t in seen) and seen[-1] == "日本"


@pytest.mark.parametrize("stop, cut", [
    ("little", "Once upon a time there was a "),
    ("e was a li", "Once upon a time ther"),          # spans several tokens
    ("Once", ""),
    (".", "Once upon a time there was a little fox"),
])
def test_stop_string_ends_at_the_token_completing_it_and_is_cut(stop, cut):
    tok = tiny_tokenizer()
    ids = tok.encode(TEXTS[0])
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), [stop, "never there"])
    stopped_at = feed(detok, ids)
    assert detok.text == cut
    # the stop string is complete in the tokens up to stopped_at, and not before
    assert stop in tok.decode(ids[: stopped_at + 1]) and stop not in tok.decode(ids[:stopped_at])


def test_earliest_of_several_stop_strings_wins_and_stops_are_ignored_before_min_tokens():
    tok = tiny_tokenizer()
    ids = tok.encode(TEXTS[0])
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), ["fox", "time"])
    feed(detok, ids)
    assert detok.text == "Once upon a "
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), ["Once"])
    assert not any(detok.append(t, check_stop=False) for t in ids[:3])


def test_a_stop_string_that_never_matches_leaves_a_trailing_partial_character():
    # max_tokens can end a request inside a multi-byte character; decoding at once gives its U+FFFD, and so must
    # the incremental path that a stop string switches on (it used to drop the waiting bytes)
    tok = tiny_tokenizer()
    prompt_ids, ids = tok.encode(PROMPT), tok.encode("café 日本")[:-2]
    detok = IncrementalDetokenizer(tok, prompt_ids, ["never there"])
    assert feed(detok, ids) is None
    assert detok.flush() == decode_completion(tok, prompt_ids, ids) == "café 日\ufffd"
    assert detok.flush() == "café 日\ufffd"      # flushing twice adds nothing


def test_flush_after_a_stop_string_keeps_the_cut_text():
    tok = tiny_tokenizer()
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), ["upon"])
    feed(detok, tok.encode(TEXTS[0]))
    assert detok.flush() == "Once "
