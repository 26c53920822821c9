"""A seeded generator of JSON schemas for the structured-output tests and the `structured` bench.

`generate_schemas(seed, count)` covers nested objects, arrays with minItems/maxItems, enums,
`required`, integers and numbers with bounds, strings with length bounds or patterns, and
anyOf. Every schema bounds every value (strings by maxLength or a bounded pattern, numbers
by minimum/maximum, arrays by maxItems, objects by their listed properties), so that even a
random model's constrained output completes within a few hundred tokens.
"""

from __future__ import annotations

import random
from typing import Any

Schema = dict[str, Any]

MAX_DEPTH = 2
_WORDS = ("alpha", "beta", "gamma", "delta", "red", "green", "blue", "on", "off", "x-1", 'q"t', "a\\b")
_PATTERNS = ("^[a-z]{1,6}$", "^[A-Z][0-9]{2}$", "^(yes|no)$", "^[0-9]{3}-[0-9]{2}$", "^x[a-f0-9]{0,4}$")
_KEYS = ("id", "name", "size", "kind", "tags", "items", "score", "meta", "flag", "note", "level", "code")


def generate_schemas(seed: int = 0, count: int = 100) -> list[Schema]:
    """`count` schemas, the same for the same seed; each an object at the top level."""
    rng = random.Random(seed)
    return [_object(rng, 0) for _ in range(count)]


def _value(rng: random.Random, depth: int) -> Schema:
    kinds = ["string", "pattern", "integer", "number", "enum", "boolean"]
    if depth < MAX_DEPTH:
        kinds += ["object", "array", "anyOf"]
    kind = rng.choice(kinds)
    if kind == "string":
        min_length = rng.randint(0, 2)
        return {"type": "string", "minLength": min_length, "maxLength": min_length + rng.randint(1, 6)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(_PATTERNS)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        low = rng.randint(-10, 10)
        return {"type": "number", "minimum": low, "maximum": low + rng.randint(1, 20)}
    if kind == "enum":
        return {"enum": rng.sample(_WORDS, rng.randint(1, 4))}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "object":
        return _object(rng, depth + 1)
    if kind == "array":
        min_items = rng.randint(0, 2)
        return {
            "type": "array",
            "items": _value(rng, depth + 1),
            "minItems": min_items,
            "maxItems": min_items + rng.randint(0, 2),
        }
    return {"anyOf": [_value(rng, depth + 1) for _ in range(rng.randint(2, 3))]}


def _object(rng: random.Random, depth: int) -> Schema:
    keys = rng.sample(_KEYS, rng.randint(1, 4))
    properties = {key: _value(rng, depth) for key in keys}
    required = [key for key in keys if rng.random() < 0.7]
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema
