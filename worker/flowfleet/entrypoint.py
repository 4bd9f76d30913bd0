"""The user's record processor, loaded from ``module:function``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowfleet.errors import EntrypointError
from flowfleet.redaction import redact


@dataclass(frozen=True)
class Processor:
    """A callable taking one record's payload. ``kind`` says what Prefect made of it:
    ``task`` and ``flow`` objects get task/flow runs under the Prefect runner; ``fn`` is
    the plain function under them, for the plain runner."""

    name: str
    call: Callable[..., Any]
    fn: Callable[..., Any]
    kind: str  # "function", "task" or "flow"
    takes_conn: bool


def describe(func: Callable[..., Any]) -> Processor:
    kind = "function"
    # Only a module that imported Prefect can hand us a Prefect object; the plain runner
    # should not pay Prefect's import time for processors that never touch it.
    if "prefect" in sys.modules:
        from prefect import Flow, Task

        kind = "task" if isinstance(func, Task) else "flow" if isinstance(func, Flow) else kind
    fn = getattr(func, "fn", func) if kind != "function" else func
    if not callable(fn):
        raise EntrypointError(f"entrypoint {func!r} is not callable")
    try:
        takes_conn = "conn" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_conn = False  # builtins without signatures take the payload positionally
    name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    return Processor(name=name, call=func, fn=fn, kind=kind, takes_conn=takes_conn)


def importable_cwd() -> None:
    """Let ``--entrypoint mymodule:process`` find ``./mymodule.py``, as ``python -m`` and
    uvicorn do. The directory goes last, so a file there never shadows an installed module
    (a stray ``queue.py`` must not replace the standard library's)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def load(spec: str) -> Processor:
    """``"package.module:function"`` -> Processor, or one line naming what is wrong."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise EntrypointError(f"entrypoint {spec!r} must look like module:function")
    importable_cwd()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise EntrypointError(
            f"entrypoint {spec!r}: module {exc.name or module_name!r} not found"
            f" (searched the current directory {os.getcwd()} and the installed packages)"
        ) from None
    except SystemExit as exc:  # a module that runs a script when imported
        raise EntrypointError(
            f"entrypoint {spec!r}: importing {module_name!r} called sys.exit({exc.code!r}); "
            "keep a module's top level free of script code (use if __name__ == '__main__')"
        ) from None
    except Exception as exc:  # the user's module failed while importing: say how
        # Its message may quote a connection string it was given.
        first = str(exc).strip().splitlines()
        raise EntrypointError(
            redact(
                f"entrypoint {spec!r}: importing {module_name!r} raised "
                f"{type(exc).__name__}: {first[0] if first else ''}"
            )
        ) from None
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise EntrypointError(
                f"entrypoint {spec!r}: {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(target):
        raise EntrypointError(f"entrypoint {spec!r} is a {type(target).__name__}, not a callable")
    return describe(target)
