"""Skips that must not hide a broken CI set-up.

Every test that needs something optional (vLLM, torch, setproctitle) asks here
instead of calling ``pytest.importorskip`` or a ``skipif`` of its own: on a
developer's machine without it the test skips, in CI (CI=true), where
scripts/setup_env.sh installs everything, its absence is a failure.
tests/test_skips.py keeps the test files to this rule.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(message: str) -> None:
    """Skip (a developer's machine) or fail (CI=true): something the test needs is not installed."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: scripts/setup_env.sh should have installed it)")
    pytest.skip(message)


def vllm_missing(message: str) -> None:
    """Skip a test that needs vLLM on a machine without it; in CI its absence is a failure."""
    missing(message)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(*modules: str) -> None:
    """Call at a test's start: skip, or fail in CI, unless every one of MODULES is installed."""
    absent = [m for m in modules if not installed(m)]
    if absent:
        missing(f"{', '.join(absent)} not installed in this python")


def needs(*modules: str) -> Callable[[F], F]:
    """A decorator for require(): the test runs only with MODULES installed (a failure in CI without)."""

    def wrap(test: F) -> F:
        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> Any:
            require(*modules)
            return test(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap
