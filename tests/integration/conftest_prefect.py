"""One real Prefect server per test session, for the tests of the Prefect runner.

Imported by the test modules that need it (``from conftest_prefect import
prefect_api_fixture``), so sessions that run no Prefect test never start one. The test
process talks to it through ``temporary_settings``, worker subprocesses through
``PrefectApi.env()``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flowfleet.throwaway import ThrowawayPrefect


@pytest.fixture(scope="session", name="prefect_api")
def prefect_api_fixture() -> Iterator[ThrowawayPrefect]:
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with ThrowawayPrefect() as server:
        with temporary_settings(
            updates={PREFECT_API_URL: server.url, PREFECT_HOME: server.client_home}
        ):
            yield server
            server.drain_client()
