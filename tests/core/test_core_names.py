"""names.py: Ollama's model-name grammar, the allow-list and same_model."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpu_bridge import names
from gpu_bridge.errors import InvalidModelName, RegistryNotAllowed

VALID = [
    # name, (host, namespace, model, tag), display
    ("llama3.2", ("registry.ollama.ai", "library", "llama3.2", "latest"), "llama3.2:latest"),
    ("llama3.2:latest", ("registry.ollama.ai", "library", "llama3.2", "latest"), "llama3.2:latest"),
    ("user/model:v1", ("registry.ollama.ai", "user", "model", "v1"), "user/model:v1"),
    ("hf.co/org/repo:Q4_K_M", ("hf.co", "org", "repo", "Q4_K_M"), "hf.co/org/repo:Q4_K_M"),
    ("host:5000/ns/m", ("host:5000", "ns", "m", "latest"), "host:5000/ns/m:latest"),
    ("host:5000/ns/m:v2", ("host:5000", "ns", "m", "v2"), "host:5000/ns/m:v2"),
    ("_private/x_y-z.1:t.a-g_", ("registry.ollama.ai", "_private", "x_y-z.1", "t.a-g_"), "_private/x_y-z.1:t.a-g_"),
    ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
     ("hf.co", "bartowski", "Llama-3.2-1B-Instruct-GGUF", "Q4_K_M"),
     "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"),
]

INVALID = [
    ("", "empty"),
    ("..", "dot-dot"),
    ("../../etc/passwd", "path traversal"),
    ("a/../b", "dot-dot part"),
    ("a//b", "empty part"),
    ("/a", "leading slash"),
    ("a/", "trailing slash"),
    ("a b", "space"),
    ("a\tb", "tab"),
    ("lläma", "non-ASCII"),
    ("模型", "CJK"),
    ("a\x00b", "NUL"),
    ("a" * 600, "over-long"),
    ("m" * 81, "model part over 80"),
    ("llama:", "trailing colon"),
    ("-llama", "leading dash"),
    (".hidden", "leading dot"),
    ("a/b/c/d", "four parts"),
    ("ns.dot/m", "dot in namespace"),
    ("m:-tag", "tag starts with dash"),
    ("a:b:c", "colon in model part"),
    ("a;rm -rf", "shell characters"),
    ("a%2Fb", "percent sign"),
]


@pytest.mark.parametrize(("name", "parts", "display"), VALID, ids=[v[0] for v in VALID])
def test_valid_names_parse(name, parts, display):
    parsed = names.parse(name)
    assert (parsed.host, parsed.namespace, parsed.model, parsed.tag) == parts
    assert parsed.display == display
    assert str(parsed) == display


@pytest.mark.parametrize(("name", "why"), INVALID, ids=[v[1] for v in INVALID])
def test_invalid_names_are_refused(name, why):
    with pytest.raises(InvalidModelName) as info:
        names.parse(name)
    assert info.value.status == 400
    assert info.value.code == "invalid_model_name"


@pytest.mark.parametrize("value", [None, 3, b"llama3", ["llama3"]])
def test_non_strings_are_refused(value):
    with pytest.raises(InvalidModelName):
        names.parse(value)


def test_allow_list_is_case_insensitive_and_defaults_to_ollama_registry():
    assert names.validate("llama3", ("registry.ollama.ai",)).host == "registry.ollama.ai"
    assert names.validate("HF.CO/org/repo:q", ("hf.co",)).model == "repo"
    with pytest.raises(RegistryNotAllowed) as info:
        names.validate("evil.example.com/ns/m:1", ("registry.ollama.ai", "hf.co"))
    assert info.value.code == "registry_not_allowed"
    assert info.value.status == 400
    assert "evil.example.com" in info.value.message


def test_validate_without_allow_list_accepts_any_host():
    assert names.validate("host:5000/ns/m").host == "host:5000"


def test_invalid_beats_registry_check():
    with pytest.raises(InvalidModelName):
        names.validate("evil.example.com/../m", ("hf.co",))


@pytest.mark.parametrize(("a", "b", "same"), [
    ("llama3", "llama3:latest", True),
    ("LLAMA3:Latest", "llama3:latest", True),
    ("llama3", "library/llama3", True),
    ("llama3", "registry.ollama.ai/library/llama3:latest", True),
    ("llama3", "llama3:8b", False),
    ("user/llama3", "llama3", False),
    ("a b", "a b", False),
])
def test_same_model(a, b, same):
    assert names.same_model(a, b) is same


_part = st.from_regex(r"\A[a-z0-9_][a-z0-9_-]{0,10}\Z")


@given(ns=_part, model=_part, tag=_part)
def test_generated_names_round_trip(ns, model, tag):
    parsed = names.parse(f"{ns}/{model}:{tag}")
    assert names.parse(parsed.display).full == parsed.full
    assert names.same_model(parsed.display, parsed.full)


@given(st.text(min_size=1, max_size=40))
def test_parse_never_raises_anything_but_invalid_model_name(text):
    try:
        parsed = names.parse(text)
    except InvalidModelName:
        return
    assert parsed.display.isascii()
    assert ".." not in parsed.display
    assert "//" not in parsed.display


# --- the grammar as one regular expression (the OpenAPI documents publish it) --------------------------------------
_ALPHABET = st.sampled_from(list("aZ9_.-:/") + ["..", "\n", " ", "é", "a" * 81, "b" * 351])


def _accepts(name: str, hosts=None) -> bool:
    try:
        names.validate(name, hosts)
    except (InvalidModelName, RegistryNotAllowed):
        return False
    return True


@pytest.mark.parametrize("name", [v[0] for v in VALID] + [i[0] for i in INVALID])
def test_the_published_pattern_accepts_exactly_what_the_parser_accepts(name):
    assert bool(re.search(names.NAME_PATTERN, name)) == _accepts(name), name


@given(st.lists(_ALPHABET, max_size=14).map("".join))
def test_the_published_pattern_and_the_parser_agree_on_generated_names(name):
    assert bool(re.search(names.NAME_PATTERN, name)) == _accepts(name), repr(name)


@given(st.lists(_ALPHABET, max_size=14).map("".join),
       st.sampled_from([("registry.ollama.ai", "hf.co"), ("hf.co",), ("HF.co", "localhost:5000")]))
def test_the_allow_list_pattern_and_validate_agree(name, hosts):
    assert bool(re.search(names.name_pattern(hosts), name)) == _accepts(name, hosts), (repr(name), hosts)


@given(st.from_regex(names.NAME_PATTERN))
def test_every_name_the_pattern_generates_parses(name):
    names.parse(name)
