"""Type checks for JSON read from untrusted files (sidecars, tune plans, metadata).

Each returns the value when it has the expected type and raises ValueError naming the field when not;
the typed readers turn that into one VitDeployError about the whole file.
"""

from __future__ import annotations

from typing import Any


def obj(value: Any, what: str, optional: bool = False) -> dict[str, Any]:
    """A JSON object (``{}`` for a missing one when ``optional``)."""
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} is a {type(value).__name__}, not an object")
    return value


def array(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what} is a {type(value).__name__}, not a list")
    return value


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is a {type(value).__name__}, not a string")
    return value


def integer(value: Any, what: str, low: int, high: int) -> int:
    """An int (not a bool or a float) in [low, high]."""
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{what} {value!r} is not an integer from {low} to {high}")
    return value
