"""shared.toolschema.validate: the JSON-schema subset tools use."""

from __future__ import annotations

import pytest

from shared.toolschema import validate

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "volume": {"type": "number", "minimum": 0, "maximum": 1},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "loud": {"type": "boolean"},
        "tags": {"type": "array"},
        "extra": {"type": "object"},
    },
    "required": ["city"],
}


def test_valid_arguments() -> None:
    args = {"city": "Paris", "days": 3, "volume": 0.5, "unit": "celsius", "loud": True, "tags": ["a"], "extra": {}}
    assert validate(args, SCHEMA) == []


def test_only_required() -> None:
    assert validate({"city": "Paris"}, SCHEMA) == []


def test_missing_required() -> None:
    problems = validate({"days": 2}, SCHEMA)
    assert problems == ["missing required argument 'city'"]


def test_several_missing_required() -> None:
    schema = {"properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a", "b"]}
    assert validate({}, schema) == ["missing required argument 'a'", "missing required argument 'b'"]


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_an_integer(value: bool) -> None:
    assert validate({"city": "x", "days": value}, SCHEMA) == ["argument 'days' must be integer"]


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_a_number(value: bool) -> None:
    assert validate({"city": "x", "volume": value}, SCHEMA) == ["argument 'volume' must be number"]


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("city", 5, "string"),
        ("city", None, "string"),
        ("days", 2.5, "integer"),
        ("days", "3", "integer"),
        ("volume", "0.5", "number"),
        ("loud", 1, "boolean"),
        ("loud", "true", "boolean"),
        ("tags", "a,b", "array"),
        ("tags", {"a": 1}, "array"),
        ("extra", [1], "object"),
    ],
)
def test_wrong_types(name: str, value, expected: str) -> None:
    args = {"city": "x", name: value} if name != "city" else {"city": value}
    assert validate(args, SCHEMA) == [f"argument '{name}' must be {expected}"]


def test_integer_is_a_number() -> None:
    assert validate({"city": "x", "volume": 1}, SCHEMA) == []
    assert validate({"city": "x", "volume": 0}, SCHEMA) == []


def test_enum() -> None:
    assert validate({"city": "x", "unit": "kelvin"}, SCHEMA) == ["argument 'unit' must be one of ['celsius', 'fahrenheit']"]
    assert validate({"city": "x", "unit": "fahrenheit"}, SCHEMA) == []


def test_enum_without_type() -> None:
    schema = {"properties": {"level": {"enum": [1, 2, "max"]}}}
    assert validate({"level": "max"}, schema) == []
    assert validate({"level": 3}, schema) == ["argument 'level' must be one of [1, 2, 'max']"]


@pytest.mark.parametrize("days", [1, 4, 7])
def test_in_range(days: int) -> None:
    assert validate({"city": "x", "days": days}, SCHEMA) == []


def test_minimum_and_maximum() -> None:
    assert validate({"city": "x", "days": 0}, SCHEMA) == ["argument 'days' must be >= 1"]
    assert validate({"city": "x", "days": 8}, SCHEMA) == ["argument 'days' must be <= 7"]
    assert validate({"city": "x", "volume": -0.01}, SCHEMA) == ["argument 'volume' must be >= 0"]
    assert validate({"city": "x", "volume": 1.5}, SCHEMA) == ["argument 'volume' must be <= 1"]


def test_wrong_type_is_reported_once() -> None:
    # a wrongly typed value is not also checked against enum/min/max
    assert validate({"city": "x", "unit": 3}, SCHEMA) == ["argument 'unit' must be string"]


def test_several_problems_are_all_reported() -> None:
    problems = validate({"days": 10, "unit": "kelvin", "loud": "yes"}, SCHEMA)
    assert set(problems) == {
        "missing required argument 'city'",
        "argument 'days' must be <= 7",
        "argument 'unit' must be one of ['celsius', 'fahrenheit']",
        "argument 'loud' must be boolean",
    }


@pytest.mark.parametrize("arguments", [None, [], ["city"], "city=Paris", 3, 2.5, True])
def test_non_dict_arguments(arguments) -> None:
    assert validate(arguments, SCHEMA) == ["arguments must be a JSON object"]


def test_unknown_arguments_allowed_by_default() -> None:
    assert validate({"city": "x", "mood": "happy"}, SCHEMA) == []


def test_unknown_arguments_rejected_when_additional_properties_false() -> None:
    schema = {**SCHEMA, "additionalProperties": False}
    assert validate({"city": "x", "mood": "happy"}, schema) == ["unknown argument 'mood'"]


def test_empty_schema_accepts_any_object() -> None:
    assert validate({}, {}) == []
    assert validate({"a": 1}, {"type": "object"}) == []
    assert validate({"a": 1}, {"properties": None, "required": None}) == []


def test_unknown_type_name_is_not_enforced() -> None:
    assert validate({"a": 1}, {"properties": {"a": {"type": "null"}}}) == []
