"""Incremental detokenizing: whole UTF-8 only, stop strings held back and never emitted."""

from engine.detokenizer import Detokenizer


# A byte-level toy vocabulary: token i is one byte; decode replaces broken UTF-8 with U+FFFD.
def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def feed(d: Detokenizer, text: str) -> str:
    out = ""
    for b in text.encode():
        out += d.add([b])
    return out


def test_multibyte_characters_are_held_until_complete():
    d = Detokenizer(decode)
    pieces = [d.add([b]) for b in "é€".encode()]
    assert pieces == ["", "é", "", "", "€"]
    assert all("\ufffd" not in p for p in pieces)


def test_incomplete_tail_becomes_replacement_char_at_flush():
    d = Detokenizer(decode)
    assert d.add(list(b"ok") + ["€".encode()[0]]) == ""  # text ends mid-character
    assert d.flush() == "ok\ufffd"


def test_stop_string_split_across_tokens_is_never_emitted():
    d = Detokenizer(decode, stop=["STOP"])
    out = feed(d, "hello ST")
    assert out == "hello "  # "ST" held: it may begin "STOP"
    out += feed(d, "OP and more")
    assert out == "hello " and d.stopped == "STOP"
    assert d.flush() == ""


def test_false_start_of_stop_string_is_released():
    d = Detokenizer(decode, stop=["STOP"])
    assert feed(d, "a STx") == "a STx"
    assert d.flush() == ""


def test_earliest_stop_string_wins():
    d = Detokenizer(decode, stop=["b", "a"])
    assert d.add(list(b"xab")) == "x" and d.stopped == "a"


def test_prompt_context_is_not_emitted():
    d = Detokenizer(decode, prompt_ids=list(b"prompt"))
    assert feed(d, " out") == " out"
