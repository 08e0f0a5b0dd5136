"""Parsing of environment values: each parser takes the raw string and returns the value or
raises ValueError whose text says what is accepted (the caller adds the variable's name)."""

from __future__ import annotations

import re
import shlex

UNSET_STRINGS = frozenset({"", "none", "null"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_SIZE_SUFFIXES = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
                  "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def is_unset(raw: str | None) -> bool:
    """The seeds write `VLLM_API_KEY=None`: None, null and the empty string mean unset."""
    return raw is None or raw.strip().lower() in UNSET_STRINGS


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("must be a boolean: 1/0, true/false, yes/no or on/off")


def parse_positive_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("must be a whole number greater than 0") from None
    if value <= 0:
        raise ValueError("must be a whole number greater than 0")
    return value


def parse_fraction(raw: str) -> float:
    """A share of device memory: 0 < x <= 1."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("must be a number in (0, 1]") from None
    if not 0 < value <= 1:
        raise ValueError("must be a number in (0, 1]")
    return value


def parse_nonnegative_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("must be a number, 0 or more") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number, 0 or more")
    return value


def parse_positive_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("must be a number greater than 0 (seconds)") from None
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a number greater than 0 (seconds)")
    return value


def parse_byte_size(raw: str) -> int:
    """Bytes, with an optional K/M/G/T (powers of 1000) or Ki/Mi/Gi/Ti (powers of 1024) suffix."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", raw)
    if not match:
        raise ValueError("must be a size in bytes, e.g. 8589934592, 8G or 8Gi")
    number, suffix = match.groups()
    value = int(float(number) * _SIZE_SUFFIXES[(suffix or "").lower()])
    if value <= 0:
        raise ValueError("must be a size in bytes greater than 0")
    return value


def parse_name_list(raw: str) -> list[str]:
    """Comma-separated names; blanks around commas are ignored, empty items dropped."""
    return [item.strip() for item in raw.split(",") if item.strip()]


def parse_shell_words(raw: str) -> list[str]:
    try:
        return shlex.split(raw)
    except ValueError as error:
        raise ValueError(f"must be shell words (quotes balanced): {error}") from None


def choice_parser(choices: dict[str, str], what: str):
    """A parser accepting the keys of `choices` (any case) and returning the mapped value."""
    accepted = " ".join(dict.fromkeys(choices.values()))
    spelled = " ".join(choices)

    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of: {spelled} ({what}: {accepted})")
        return choices[value]

    return parse


def pattern_parser(pattern: str, accepted: str):
    compiled = re.compile(pattern)

    def parse(raw: str) -> str:
        value = raw.strip()
        if not compiled.fullmatch(value):
            raise ValueError(f"must be {accepted}")
        return value

    return parse
