"""Errors that reach users: each carries one line that says what to do, never a secret."""

from __future__ import annotations


class FlowfleetError(Exception):
    """Base of every error flowfleet raises on purpose; the CLI prints its message alone."""


class DatabaseConfigError(FlowfleetError):
    """A database name with no connection string configured, or an unusable type."""


class DatabaseUnavailableError(FlowfleetError):
    """The database did not answer; the message names it by name and host, not password."""


class SchemaError(FlowfleetError):
    """The database's flowfleet schema is missing or older than this code needs."""


class InvalidRecordError(FlowfleetError, ValueError):
    """A record that can never be processed: rejected before anything is enqueued."""


class ConfigError(FlowfleetError, ValueError):
    """A setting whose value cannot be read as the type its default has."""


class EntrypointError(FlowfleetError):
    """A record processor that cannot be loaded from its ``module:function``."""
