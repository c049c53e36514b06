"""keep_alive as our API accepts it: Go durations, seconds, forever; bounded; one pattern for the documents."""

from __future__ import annotations

import re

import pytest

from gpu_bridge import keep_alive
from gpu_bridge.errors import InvalidRequest


@pytest.mark.parametrize(("value", "seconds"), [
    ("30s", 30), ("5m", 300), ("1h30m", 5400), ("1.5s", 1.5), (".5h", 1800), ("250ms", 0.25),
    ("forever", -1), ("-1", -1), (-1, -1), (90, 90), (2.5, 2.5), (None, None), ("8760h", 8760 * 3600),
])
def test_accepted_values_become_seconds(value, seconds):
    assert keep_alive.parse(value) == seconds


@pytest.mark.parametrize(("value", "words"), [
    ("10", "has no unit"), ("0s", "unload the model at once"), (0, "unload the model at once"),
    (-2, "unload the model at once"), ("8761h", "longer than a year"), (1e300, "longer than a year"),
    (float("nan"), "not a finite number"), ("2y", "not a duration"), (" 5m", "not a duration"),
    ("FOREVER", "not a duration"), ("-5m", "not a duration"), ("", "not a duration"),
    (True, "string or a number"), ([], "string or a number"), ({}, "string or a number"),
])
def test_refused_values_say_why(value, words):
    with pytest.raises(InvalidRequest) as info:
        keep_alive.parse(value)
    assert words in info.value.message and info.value.status == 400


@pytest.mark.parametrize("text", ["30s", "1h30m", "forever", "-1", "0s", "10", " 5m", "2y", "1.h", "0.0s", "1ns"])
def test_the_published_pattern_matches_exactly_the_strings_parse_does_not_refuse_for_their_form(text):
    """The OpenAPI documents publish PATTERN: a string it accepts is refused only for its length."""
    try:
        keep_alive.parse(text)
        accepted = True
    except InvalidRequest as exc:
        accepted = "longer than a year" in exc.message
    assert bool(re.fullmatch(keep_alive.PATTERN, text)) is accepted


def test_describe_is_for_people():
    assert [keep_alive.describe(v) for v in (-1, 5400, 45, 1.5, 3600)] == ["forever", "1h30m", "45s", "1.5s", "1h"]
    assert "default" in keep_alive.describe(None)
