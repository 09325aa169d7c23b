"""Stop tokens and stop strings (`mythos.stop`), shared by generate, the serving engine and lm-eval."""

import random

import pytest

from mythos.stop import StopTracker, find_stop, partial_stop_len
from mythos.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()


def pieces(*parts: str):
    """A decode function over a toy vocabulary: token i is parts[i] (multi-character tokens)."""
    return lambda ids: "".join(parts[i] for i in ids)


def run(tracker: StopTracker, tokens) -> tuple[list[str], bool]:
    out, stopped = [], False
    for t in tokens:
        text, stopped = tracker.add(t)
        out.append(text)
        if stopped:
            break
    return out, stopped


def test_find_stop_is_the_earliest_start_among_all_stop_strings():
    assert find_stop("hello world", ["world", "lo"]) == 3
    assert find_stop("hello world", ["xyz"]) == -1
    assert find_stop("abab", ["ab"], start=1) == 2
    assert find_stop("abc", ["", "c"]) == 2  # empty stop strings are ignored


def test_partial_stop_len_is_the_longest_suffix_that_could_still_become_a_stop():
    assert partial_stop_len("xEN", ["END"]) == 2
    assert partial_stop_len("xaba", ["abab"]) == 3  # overlapping prefixes: the longest one
    assert partial_stop_len("xaa", ["aab", "b"]) == 2
    assert partial_stop_len("xEND", ["END"]) == 0  # a complete stop string is a match, not a prefix
    assert partial_stop_len("aEN", ["aEN?", "EN?"]) == 3
    assert partial_stop_len("aEN", ["aEN?", "EN?"], start=1) == 2  # only text after `start` can be held
    assert partial_stop_len("abc", []) == 0


def test_stop_string_split_across_tokens_is_held_back_then_cut():
    t = StopTracker(BYTES.decode, ["END", "xy"])
    out, stopped = run(t, b"abcEN")
    assert "".join(out) == "abc" and not stopped  # "EN" may be the start of "END": held back
    assert t.add(ord("D")) == ("", True)
    assert t.text == "abc" and t.finish_reason == "stop" and t.flush() == ""


def test_a_held_prefix_that_does_not_complete_is_released():
    t = StopTracker(BYTES.decode, ["END"])
    assert [t.add(b)[0] for b in b"abENx"] == ["a", "b", "", "", "ENx"]
    assert not t.stopped and t.finish_reason == "length"


def test_flush_releases_held_text_when_the_budget_ends():
    t = StopTracker(BYTES.decode, ["END"])
    out, _ = run(t, b"abEN")
    assert "".join(out) == "ab" and t.flush() == "EN" and t.text == "abEN"


def test_earliest_match_wins_within_one_token_and_across_stops():
    decode = pieces("x", "abcd", "ab", "cd")
    t = StopTracker(decode, ["cd", "bc"])  # both complete in one token: "bc" starts first
    assert t.add(0) == ("x", False) and t.add(1) == ("a", True)
    assert t.text == "xa"
    # a stop string that completes wins over a longer one that started earlier but is incomplete
    t = StopTracker(decode, ["abcdX", "cd"])
    assert run(t, [2, 3]) == (["", "ab"], True) and t.text == "ab"
    # the match may begin inside one multi-character token and end inside the next
    t = StopTracker(pieces("hello wo", "rld!"), ["o wor"])
    assert t.add(0) == ("hell", False) and t.add(1) == ("", True) and t.text == "hell"


def test_stop_token_ends_the_sequence_without_its_text_and_releases_held_text():
    t = StopTracker(BYTES.decode, ["END"], stop_tokens=[BYTES.eos_id])
    out, _ = run(t, b"okEN")
    assert "".join(out) == "ok"
    assert t.add(BYTES.eos_id) == ("EN", True)  # no stop string can complete any more
    assert t.tokens == list(b"okEN") and t.text == "okEN" and t.finish_reason == "stop"
    assert t.add(ord("D")) == ("", True) and t.tokens == list(b"okEN")  # finished: later tokens ignored


def test_tokens_only_without_a_decoder():
    t = StopTracker(stop_tokens=[7])
    assert [t.add(x) for x in (3, 4, 7, 5)] == [("", False), ("", False), ("", True), ("", True)]
    assert t.tokens == [3, 4] and t.finish_reason == "stop" and t.text == ""
    with pytest.raises(ValueError, match="decode"):
        StopTracker(stop_strings=["x"])


def test_incomplete_utf8_is_held_until_the_character_is_complete():
    t = StopTracker(BYTES.decode)
    e_acute = "é".encode()
    assert t.add(e_acute[0]) == ("", False) and t.add(e_acute[1]) == ("é", False)
    t = StopTracker(BYTES.decode, ["é!"])
    assert [t.add(b) for b in "aé!".encode()] == [("a", False), ("", False), ("", False), ("", True)]


def test_streamed_text_equals_the_text_cut_at_the_first_stop_string():
    """Whatever the tokens and stop strings: the streamed pieces plus the flushed tail are the
    full text cut before the first stop string found by scanning the text as it grows."""
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 14)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        t = StopTracker(BYTES.decode, stops)
        out, stopped = run(t, text.encode())
        got = "".join(out) + t.flush()
        # the reference: grow the text one character at a time, stop when any stop string is in it
        want, ref_stopped = text, False
        for n in range(1, len(text) + 1):
            hit = find_stop(text[:n], stops)
            if hit >= 0:
                want, ref_stopped = text[:hit], True
                break
        assert (got, stopped) == (want, ref_stopped), (text, stops)
        assert t.text == want
