"""ConfigManager: the seed's hierarchical settings, typed like their defaults."""

from __future__ import annotations

import pytest

from flowfleet.config import ConfigError, ConfigManager, coerce
from flowfleet.database import env_name, environment

KEYS = (
    "DEVELOPMENT_RPA1_BATCH_SIZE",
    "DEVELOPMENT_GLOBAL_BATCH_SIZE",
    "GLOBAL_BATCH_SIZE",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_ENVIRONMENT", raising=False)
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)


def test_candidates_follow_the_seed_hierarchy_most_specific_first() -> None:
    assert ConfigManager("rpa1").candidates("batch_size") == list(KEYS)


def test_lookup_falls_through_the_hierarchy(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ConfigManager("rpa1")
    assert config.get_variable("batch_size", 7) == 7

    monkeypatch.setenv("GLOBAL_BATCH_SIZE", "30")
    assert config.get_variable("batch_size", 7) == 30

    monkeypatch.setenv("DEVELOPMENT_GLOBAL_BATCH_SIZE", "20")
    assert config.get_variable("batch_size", 7) == 20

    monkeypatch.setenv("DEVELOPMENT_RPA1_BATCH_SIZE", "10")
    assert config.get_variable("batch_size", 7) == 10

    # Another flow in the same environment skips the rpa1-specific value.
    assert ConfigManager("rpa2").get_variable("batch_size", 7) == 20


def test_environment_comes_from_prefect_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVELOPMENT_RPA1_BATCH_SIZE", "10")
    monkeypatch.setenv("PRODUCTION_RPA1_BATCH_SIZE", "99")
    monkeypatch.setenv("PREFECT_ENVIRONMENT", "production")
    assert environment() == "production"
    assert ConfigManager("rpa1").get_variable("batch_size", 7) == 99
    assert ConfigManager("rpa1", environment_name="development").get_variable("batch_size", 7) == 10


def test_blank_environment_means_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_ENVIRONMENT", "  ")
    assert environment() == "development"


@pytest.mark.parametrize(
    ("raw", "default", "expected"),
    [
        ("true", False, True),
        ("TRUE", False, True),
        (" yes ", False, True),
        ("1", False, True),
        ("on", False, True),
        ("false", True, False),
        ("No", True, False),
        ("0", True, False),
        ("off", True, False),
        ("42", 0, 42),
        (" -3 ", 0, -3),
        ("2.5", 0.0, 2.5),
        ("3", 1.0, 3.0),
        ('["a", "b"]', [], ["a", "b"]),
        ('{"k": 1}', {}, {"k": 1}),
        ("plain text", "x", "plain text"),
    ],
)
def test_values_are_typed_like_the_default(raw: str, default: object, expected: object) -> None:
    value = coerce(raw, default, "SOME_VAR")
    assert value == expected
    assert type(value) is type(expected)


def test_float_default_gives_a_float_even_for_an_integer_string(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GLOBAL_BATCH_SIZE", "3")
    value = ConfigManager("rpa1").get_variable("batch_size", 1.5)
    assert value == 3.0 and isinstance(value, float)


def test_no_default_returns_the_raw_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOBAL_BATCH_SIZE", "25")
    assert ConfigManager("rpa1").get_variable("batch_size") == "25"
    assert ConfigManager("rpa1").get_variable("missing_key") is None


@pytest.mark.parametrize(
    ("raw", "default"),
    [
        ("maybe", False),
        ("2.5", 0),
        ("ten", 0),
        ("fast", 1.0),
        ("not json", []),
        ('{"a": 1}', []),
        ("[1]", {}),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, raw: str, default: object
) -> None:
    monkeypatch.setenv("DEVELOPMENT_GLOBAL_BATCH_SIZE", raw)
    with pytest.raises(ConfigError) as info:
        ConfigManager("rpa1").get_variable("batch_size", default)
    assert "DEVELOPMENT_GLOBAL_BATCH_SIZE" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_seed_configuration_example(monkeypatch: pytest.MonkeyPatch) -> None:
    # The seed's "4. Configuration" block.
    monkeypatch.setenv("DEVELOPMENT_SURVEY_PROCESSOR_USE_DISTRIBUTED_PROCESSING", "true")
    monkeypatch.setenv("DEVELOPMENT_SURVEY_PROCESSOR_DISTRIBUTED_BATCH_SIZE", "50")
    config = ConfigManager("survey_processor")
    assert config.get_variable("use_distributed_processing", False) is True
    assert config.get_variable("distributed_batch_size", 10) == 50
    assert ConfigManager("other_flow").get_variable("use_distributed_processing", False) is False


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (("development", "rpa_db", "type"), "DEVELOPMENT_RPA_DB_TYPE"),
        (
            ("production", "global", "rpa_db", "connection_string"),
            ("PRODUCTION_GLOBAL_RPA_DB_CONNECTION_STRING"),
        ),
        (("development", "SurveyHub", "pool_max_size"), "DEVELOPMENT_SURVEYHUB_POOL_MAX_SIZE"),
        (("dev", "my-flow.v2", "batch size"), "DEV_MY_FLOW_V2_BATCH_SIZE"),
        (("dev", "__odd__", "key"), "DEV_ODD_KEY"),
    ],
)
def test_env_name(parts: tuple[str, ...], expected: str) -> None:
    assert env_name(*parts) == expected
