"""One source for defaults: the settings table (settings.py). The configuration's dataclasses take
their field defaults from it, a configuration read from an empty environment holds them, and the
scheduler's settings the server passes (config.scheduler_settings) are its values; the scheduler's
own defaults (a bare SchedulerSettings(), as tests and bench/ build it) agree with the table."""

from __future__ import annotations

import dataclasses

import pytest

from vllm_launcher.config import (
    ClusterConfig,
    ServerConfig,
    load_config,
    scheduler_settings,
)
from vllm_launcher.scheduler import SchedulerSettings
from vllm_launcher.settings import CLUSTER_SETTINGS, SERVER_SETTINGS, Setting

MODEL = {"VLLM_MODEL": "org/model"}
CLUSTER = {"VLLM_CLUSTER_ROLE": "head", "VLLM_CLUSTER_INTERFACE": "lo", "VLLM_CLUSTER_TOKEN_FILE": "/absent"}


def field_defaults(cls: type) -> dict[str, object]:
    """Each field's default; a required field (no default) as MISSING."""
    return {field.name: field.default for field in dataclasses.fields(cls)}


@pytest.mark.parametrize(("cls", "table"), [(ServerConfig, SERVER_SETTINGS), (ClusterConfig, CLUSTER_SETTINGS)],
                         ids=["server", "cluster"])
def test_every_field_is_a_setting_and_defaults_to_the_tables_value(cls: type, table: tuple[Setting, ...]):
    defaults = field_defaults(cls)
    assert set(defaults) == {setting.key for setting in table}
    for setting in table:
        # a required field (the cluster's interface and token file) is a setting without a default
        expected = dataclasses.MISSING if defaults[setting.key] is dataclasses.MISSING else setting.default
        assert defaults[setting.key] == expected, setting.key
        if expected is dataclasses.MISSING:
            assert setting.default is None, setting.key


def test_a_configuration_read_from_no_settings_holds_the_tables_defaults():
    config = load_config({**MODEL, **CLUSTER})
    assert config.server == ServerConfig()
    assert config.cluster == ClusterConfig(interface="lo", token_file="/absent", role="head")
    for setting in SERVER_SETTINGS:
        assert getattr(config.server, setting.key) == setting.default, setting.key
    for setting in CLUSTER_SETTINGS:
        if setting.env not in CLUSTER:
            assert getattr(config.cluster, setting.key) == setting.default, setting.key


def test_the_scheduler_defaults_are_the_servers_at_its_defaults():
    assert SchedulerSettings() == scheduler_settings(load_config(MODEL).server)


# Every server setting the scheduler reads, set away from its default: (variable, value, field).
SET = [("VLLM_SWITCH_MAX_WAIT", "7.5", "switch_max_wait", 7.5), ("VLLM_DRAIN_TIMEOUT", "9", "drain_timeout", 9.0),
       ("VLLM_QUEUE_MAX", "33", "queue_max", 33), ("VLLM_QUEUE_TIMEOUT", "44", "queue_timeout", 44.0),
       ("VLLM_GPU_MEMORY_BUDGET", "0.95", "memory_budget", 0.95),
       ("VLLM_ENGINE_MAX_RESTARTS", "2", "max_restarts", 2)]


def test_the_scheduler_gets_every_server_setting_it_reads():
    settings = scheduler_settings(load_config({**MODEL, **{name: raw for name, raw, _, _ in SET}}).server)
    for name, _, field, value in SET:
        assert getattr(settings, field) == value != getattr(SchedulerSettings(), field), name
    others = {field.name for field in dataclasses.fields(SchedulerSettings)} - {field for _, _, field, _ in SET}
    assert all(getattr(settings, field) == getattr(SchedulerSettings(), field) for field in others)
