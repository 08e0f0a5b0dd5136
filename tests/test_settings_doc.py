"""docs/settings.md's table of server settings says the defaults the settings table
(launcher/vllm_launcher/settings.py) holds: a default changed there and not in the page fails
here. A default written as a literal (`900`) must parse, with the setting's own parser, to the
table's default; prose ("vLLM's", "required") is not checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vllm_launcher.settings import CLUSTER_SETTINGS, ENGINE_SETTINGS, SERVER_SETTINGS

PAGE = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
BY_NAME = {name: setting for setting in (*SERVER_SETTINGS, *ENGINE_SETTINGS, *CLUSTER_SETTINGS) for name in setting.names}


def documented_defaults() -> list[tuple[str, str]]:
    """(variable, literal default) for each row of the page's first table whose variables and
    defaults pair up one to one (`A` / `B` | `1` / `2` s), the literal without its unit."""
    table = PAGE.read_text().split("\n| variable", 1)[1].split("\n\n", 1)[0]
    pairs = []
    for row in table.splitlines()[2:]:
        variables_cell, default_cell = row.split(" | ")[:2]
        variables_cell = re.sub(r"\([^)]*\)", "", variables_cell)        # aliases
        variables = re.findall(r"`([A-Z][A-Z0-9_]+)`", variables_cell)
        defaults = [part.strip() for part in re.split(r" / |, ", default_cell)]
        if len(variables) != len(defaults):
            continue
        for variable, default in zip(variables, defaults, strict=True):
            literal = re.fullmatch(r"`([^`]+)`(?: s)?", default)
            if literal and not literal.group(1).startswith("$"):
                pairs.append((variable, literal.group(1)))
    return pairs


def test_the_page_has_literal_defaults_to_check():
    checked = dict(documented_defaults())
    assert {"VLLM_PORT", "VLLM_DRAIN_TIMEOUT", "VLLM_QUEUE_MAX", "VLLM_MAX_BODY_BYTES"} <= set(checked), checked


@pytest.mark.parametrize(("variable", "literal"), documented_defaults())
def test_a_documented_default_is_the_settings_tables(variable, literal):
    setting = BY_NAME.get(variable)
    assert setting is not None, f"docs/settings.md names {variable}, which is not a setting"
    assert setting.parse(literal) == setting.default, (
        f"docs/settings.md says {variable} defaults to {literal}; settings.py says {setting.default!r}")
