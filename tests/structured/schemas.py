"""JSON schemas for tests and benchmarks: every string is bounded (a random-weight model inside an
unbounded string rarely closes it), every other feature a schema can ask for appears."""

NAME = {"type": "string", "maxLength": 8}

SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                                                "nick": NAME},
                                               "required": ["id", "nick"], "additionalProperties": False},
                                      "active": {"type": "boolean"}},
     "required": ["user", "active"], "additionalProperties": False},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                      "score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["zip", "score"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "point"}, "xy": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9},
                                                                          "minItems": 2, "maxItems": 2}},
     "required": ["kind", "xy"], "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 6},
                                      "note": {"type": ["string", "null"], "maxLength": 5},
                                      "level": {"enum": [1, 2, 3]}},
     "required": ["title", "level"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2,
                                                "items": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                                                                           "qty": {"type": "integer", "minimum": 1, "maximum": 5}},
                                                          "required": ["sku", "qty"], "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"choice": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]},
                                      "label": {"type": "string", "maxLength": 4}},
     "required": ["choice"], "additionalProperties": False},
]


def schema_variant(i: int) -> dict:
    """The i-th of many distinct schemas (a different grammar each): one of SCHEMAS with a marker
    property of its own."""
    import copy

    schema = copy.deepcopy(SCHEMAS[i % len(SCHEMAS)])
    schema["properties"][f"n{i}"] = {"type": "integer", "minimum": 0, "maximum": i}
    schema["required"] = schema["required"] + [f"n{i}"]
    return schema
