"""The README, run as written: its "Your first worker" section against a throwaway
PostgreSQL, its quick start, and its links (none may leave the repository)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# The one thing the test changes: the example connection string becomes the throwaway's.
EXAMPLE_DSN = "postgresql://me:secret@localhost:5432/mydb"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def blocks(text: str) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in FENCE.findall(text)]


def test_quick_start_is_the_two_commands() -> None:
    (lang, body), *_ = blocks(section("Quick start"))
    commands = [line.split("#")[0].strip() for line in body.splitlines()]
    assert lang == "bash" and commands == ["make demo", "make test"]


def test_no_link_leaves_the_repository() -> None:
    architecture = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for text in (README, architecture):
        assert "../shared" not in text and "DESIGN.md" not in text
    assert "## The loop, as data flows" in architecture and "## Rooms" in architecture
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target


@pytest.mark.slow
def test_your_first_worker_runs_as_written(empty_dsn: str, tmp_path: Path) -> None:
    steps = blocks(section("Your first worker"))
    install, *rest = [body for lang, body in steps if lang == "bash"]
    assert install.count(EXAMPLE_DSN) == 1
    for lang, body in steps:
        if lang == "python":
            name = body.splitlines()[0].removeprefix("# ").strip()
            assert name.endswith(".py"), "a python block starts with its file name"
            (tmp_path / name).write_text(body, encoding="utf-8")
    # The install step runs in the clone; the rest "in a directory of your own".
    script = "\n".join(
        [
            "set -euo pipefail",
            f"cd {ROOT}",
            install.replace(EXAMPLE_DSN, empty_dsn),
            f"cd {tmp_path}",
            *rest,
        ]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWFLEET_", "PREFECT_"))}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "enqueued 3 records for surveys" in result.stdout
    assert "enqueued 1000 records for surveys" in result.stdout
    assert "KeyError" in result.stdout  # `flowfleet failed surveys` shows SURV-003's error

    with psycopg.connect(empty_dsn) as conn:
        done = conn.execute(
            "SELECT count(*), count(DISTINCT payload->>'survey_id') FROM processing_history"
            " WHERE flow_name = 'surveys'"
        ).fetchone()
        failed = conn.execute(
            "SELECT payload->>'survey_id', retry_count FROM processing_queue"
            " WHERE status = 'failed'"
        ).fetchall()
        left = conn.execute("SELECT count(*) FROM processing_queue WHERE status <> 'failed'")
        assert left.fetchone() == (0,)
    assert done == (1002, 1002)
    assert failed == [("SURV-003", 3)]
