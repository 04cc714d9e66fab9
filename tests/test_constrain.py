"""Output constrained to JSON schemas, regexes and grammars (llguidance), sampled at
temperature 1 on the real SmolLM2: every output must validate (``jsonschema``, ``re``)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import phimlx
from phimlx.constrain import grammar_text

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")


def random_schema(rng: np.random.Generator, depth: int = 0) -> dict:
    """A random schema whose every valid instance is short (bounded strings and arrays, no
    extra properties), so that a sampled output ends well within max_tokens."""
    # No unbounded "number": its digits have no bound in llguidance's JSON grammar, and at
    # temperature 1 a small model may write digits until max_tokens (see the README).
    kinds = ["string", "integer", "boolean", "enum"]
    if depth < 2:
        kinds += ["object", "array"]
    kind = kinds[rng.integers(len(kinds))]
    if kind == "string":
        return {"type": "string", "minLength": 1, "maxLength": int(rng.integers(1, 9))}
    if kind == "integer":
        lo = int(rng.integers(-50, 50))
        return {"type": "integer", "minimum": lo, "maximum": lo + int(rng.integers(0, 200))}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        words = ["red", "green", "blue", "cat", "dog", 3, None, True]
        k = int(rng.integers(1, 4))
        return {"enum": [words[i] for i in rng.choice(len(words), k, replace=False)]}
    if kind == "array":
        lo = int(rng.integers(0, 2))
        return {
            "type": "array",
            "items": random_schema(rng, depth + 1),
            "minItems": lo,
            "maxItems": lo + int(rng.integers(0, 3)),
        }
    names = ["name", "age", "tags", "ok", "kind", "size", "items"]
    chosen = [names[i] for i in rng.choice(len(names), int(rng.integers(1, 4)), replace=False)]
    props = {n: random_schema(rng, depth + 1) for n in chosen}
    required = [n for n in chosen if rng.random() < 0.7]
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def schemas(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        s = random_schema(rng)
        if s.get("type") == "object":  # the top level is an object, as APIs ask for
            out.append(s)
    return out


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    model = phimlx.load(smollm2_path, backend="numpy")
    yield model
    model.close()


PROMPT = "Reply with a JSON object."


def check_json(model: phimlx.Model, schema: dict, seed: int) -> None:
    r = model.generate(
        PROMPT, json_schema=schema, temperature=1.0, seed=seed, max_tokens=300, repeat_penalty=1.0
    )
    assert r.finish_reason == "stop", (schema, r.text)
    jsonschema.validate(json.loads(r.text), schema)


def test_fifty_random_schemas_sampled_at_temperature_one(smollm2):
    for i, schema in enumerate(schemas(50, seed=0)):
        check_json(smollm2, schema, seed=i)


def test_json_object_mode_and_schema_text(smollm2):
    r = smollm2.generate(PROMPT, json_schema=True, temperature=0, max_tokens=300)
    assert r.finish_reason == "stop" and isinstance(json.loads(r.text), dict)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    r = smollm2.generate(PROMPT, json_schema=json.dumps(schema), temperature=0, max_tokens=200)
    assert r.finish_reason == "stop", r.text
    jsonschema.validate(json.loads(r.text), schema)
    schema = {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5}},
        "required": ["x"],
        "additionalProperties": False,
    }
    r = smollm2.generate("A JSON with a number x.", json_schema=schema, temperature=0)
    assert r.finish_reason == "stop", r.text
    jsonschema.validate(json.loads(r.text), schema)


@pytest.mark.parametrize(
    "pattern",
    [r"\d{4}-\d{2}-\d{2}", r"(yes|no), because [a-z ]{3,20}\.", r"[A-Z][a-z]{1,12} [0-9]{1,3}"],
)
def test_regex(smollm2, pattern):
    for seed in range(4):
        r = smollm2.generate(
            "Answer.", regex=pattern, temperature=1.0, seed=seed, max_tokens=60, cache=False
        )
        assert r.finish_reason == "stop" and re.fullmatch(pattern, r.text), r.text


GBNF = r"""
root   ::= item (", " item){0,2}
item   ::= color " " animal
color  ::= "red" | "green" | "blue"
animal ::= "cat" | "dog"
"""
LARK = r"""
start: "x=" NUMBER ("+" NUMBER)*
NUMBER: /[0-9]{1,3}/
"""


def test_gbnf_and_lark_grammars(smollm2):
    item = r"(red|green|blue) (cat|dog)"
    for seed in range(4):
        r = smollm2.generate("List pets.", grammar=GBNF, temperature=1.0, seed=seed, max_tokens=40)
        assert re.fullmatch(rf"{item}(, {item}){{0,2}}", r.text), r.text
        r = smollm2.generate(
            "Add numbers.", grammar=LARK, temperature=1.0, seed=seed, max_tokens=40
        )
        assert re.fullmatch(r"x=[0-9]{1,3}(\+[0-9]{1,3})*", r.text) or (
            r.finish_reason == "length" and re.fullmatch(r"x=[0-9+]*", r.text)
        ), r.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"json_schema": {"type": "nope"}}, "nope"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"json_schema": [1, 2]}, "JSON object"),
        ({"regex": "(unclosed"}, "."),
        ({"grammar": "root ::= ( "}, "."),
        ({"json_schema": True, "regex": "a"}, "one of"),
    ],
)
def test_invalid_constraints_fail_before_compute(smollm2, kwargs, match):
    calls = []
    session = smollm2.new_session

    def counting(*a, **k):  # no session is opened: the error comes first
        calls.append(1)
        return session(*a, **k)

    smollm2.new_session = counting
    try:
        with pytest.raises(phimlx.ConstraintError, match=match):
            smollm2.stream("x", **kwargs)
    finally:
        del smollm2.new_session
    assert calls == []


def test_grammar_text_without_a_model():
    assert grammar_text() is None
    assert "regex" in grammar_text(regex="a+").lower() or grammar_text(regex="a+")


def test_constraint_with_logprobs_and_batch(smollm2):
    """Constrained output composes with logprobs (the model's own distribution) and with a
    batch (each sequence its own constraint): each equals the sequence run alone."""
    schema = schemas(3, seed=7)
    kw = dict(temperature=0, max_tokens=120, repeat_penalty=1.0, cache=False)
    alone = [smollm2.generate(PROMPT, json_schema=s, logprobs=1, **kw) for s in schema]
    for r, s in zip(alone, schema, strict=True):
        jsonschema.validate(json.loads(r.text), s)
        assert len(r.logprobs) == len(r.tokens)
    batch = [
        smollm2.batch_generate([PROMPT], json_schema=s, **kw)[0] for s in schema[:1]
    ] + smollm2.batch_generate([PROMPT, PROMPT], json_schema=schema[1], **kw)
    assert batch[0].tokens == alone[0].tokens
    assert batch[1].tokens == batch[2].tokens == alone[1].tokens


def test_mlx_backend_constrained(smollm2_path):
    pytest.importorskip("mlx.core")
    with phimlx.load(smollm2_path, backend="mlx") as model:
        for i, schema in enumerate(schemas(3, seed=11)):
            check_json(model, schema, seed=i)
        r = model.generate("Answer.", regex=r"(yes|no)!", temperature=1.0, seed=0, max_tokens=10)
        assert re.fullmatch(r"(yes|no)!", r.text)


@pytest.mark.parametrize("pattern", ["½%", "é{2}", "x y", "[0-9]+ ü"])
def test_forced_bytes_on_a_sentencepiece_vocabulary(tiny_phi3, pattern):
    """Bytes a constraint forces are tokenized exactly (no "▁" space prefix) on a Phi-3-like
    SentencePiece vocabulary, whose random weights would pick anything."""
    with phimlx.load(tiny_phi3, backend="numpy") as model:
        for seed in range(3):
            r = model.generate(
                "hello", regex=pattern, temperature=1.0, seed=seed, max_tokens=12, chat=False
            )
            assert re.fullmatch(pattern, r.text) or (
                r.finish_reason == "length" and pattern == "[0-9]+ ü"
            ), r.text
