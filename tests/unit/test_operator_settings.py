"""The operator's typed spec and its settings from env."""

from __future__ import annotations

import pytest

from flowfleet_operator.model import InvalidSpec, parse_spec, prefect_api_url
from flowfleet_operator.settings import SettingsError, load_settings

BASE = {
    "flowName": "survey_processor",
    "image": "flowfleet:dev",
    "entrypoint": "m:f",
    "database": {"secretRef": {"name": "s"}},
}


def test_settings_from_env() -> None:
    s = load_settings(
        {
            "FLOWFLEET_OPERATOR_NAMESPACES": "a, b,,",
            "FLOWFLEET_OPERATOR_PREFECT_API_URL": "http://prefect:4200/api",
            "FLOWFLEET_OPERATOR_LOG_LEVEL": "debug",
            "FLOWFLEET_OPERATOR_LOG_FORMAT": "TEXT",
            "FLOWFLEET_OPERATOR_HTTP_PORT": "9090",
        }
    )
    assert s.namespaces == ("a", "b")
    assert (s.prefect_api_url, s.log_level, s.log_format, s.http_port) == (
        "http://prefect:4200/api",
        "DEBUG",
        "text",
        9090,
    )
    assert load_settings({}).namespaces == ()


def test_bad_setting_names_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"^FLOWFLEET_OPERATOR_HTTP_PORT: "):
        load_settings({"FLOWFLEET_OPERATOR_HTTP_PORT": "eighty"})


def test_spec_defaults_and_invalid_spec_names_the_field() -> None:
    spec = parse_spec(BASE)
    assert (spec.runner, spec.replicas, spec.database.migrate) == ("prefect", None, True)
    with pytest.raises(InvalidSpec, match=r"^spec\.batchSize: "):
        parse_spec({**BASE, "batchSize": 0})
    with pytest.raises(InvalidSpec, match=r"spec\.minReplicas must not exceed spec\.maxReplicas"):
        parse_spec({**BASE, "minReplicas": 5, "maxReplicas": 2})


def test_prefect_api_url_from_spec_then_operator_default() -> None:
    assert prefect_api_url(parse_spec(BASE), None) is None
    assert prefect_api_url(parse_spec(BASE), "http://d/api") == "http://d/api"
    own = parse_spec({**BASE, "prefect": {"apiUrl": "http://own/api"}})
    assert prefect_api_url(own, "http://d/api") == "http://own/api"
    assert prefect_api_url(parse_spec({**BASE, "runner": "plain"}), "http://d/api") is None
