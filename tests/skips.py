"""Skips that must not hide a broken CI set-up."""

from __future__ import annotations

import os

import pytest


def vllm_missing(message: str) -> None:
    """Skip a test that needs vLLM on a machine without it; in CI (CI=true), where
    scripts/setup_env.sh installs vLLM, its absence is a failure, not a skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI=true: scripts/setup_env.sh should have installed it)")
    pytest.skip(message)
