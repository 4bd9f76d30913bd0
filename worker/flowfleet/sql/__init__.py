"""Named SQL: migrations (``NNNN_name.sql``) and queries (``queries.sql``), loaded once."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

_NAME = re.compile(r"^-- name: (_?[a-z_]+)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@functools.cache
def queries() -> dict[str, str]:
    text = resources.files(__package__).joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    names = parts[1::2]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        # A second definition would silently replace the first one's statement.
        raise RuntimeError(f"queries.sql names {', '.join(twice)} more than once")
    named = {name: body.strip() for name, body in zip(names, parts[2::2], strict=True)}
    # Fragments (names starting with "_") are shared text, spliced in where a query says
    # {{_name}}: the claim's picking logic exists once for both statements that claim.
    fragments = {name: named.pop(name).rstrip(";") for name in list(named) if name[0] == "_"}
    for name, body in named.items():
        # Fragments may name fragments: splice until nothing changes.
        spliced = None
        while spliced != body:
            spliced = body
            for fragment, text in fragments.items():
                body = body.replace("{{" + fragment + "}}", text)
        if "{{" in body:
            raise RuntimeError(f"query {name!r} names an unknown fragment")
        named[name] = body
    return named


def query(name: str) -> str:
    try:
        return queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in queries.sql") from None


@functools.cache
def migrations() -> tuple[Migration, ...]:
    found = []
    for entry in resources.files(__package__).iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 0001.. without gaps, found {versions}")
    return tuple(found)


def latest_version() -> int:
    return migrations()[-1].version
