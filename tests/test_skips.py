"""The rule of tests/skips.py: nothing the package or CI needs may turn into a silent skip."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import skips

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent
# A skipif on one of these is about the machine (platform, root), not about a missing install.
MACHINE_CONDITIONS = ("sys.platform", "os.geteuid", "platform.")


def _calls(tree: ast.AST, dotted: str) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == dotted
    ]


def test_no_test_file_skips_on_a_missing_install_by_itself() -> None:
    """pytest.importorskip, or a skipif on an availability probe, skips in CI too (a broken import of
    the package's own modules became a skip this way): such tests go through skips.require/needs."""
    found: list[str] = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == "skips.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [f"{path.name}:{line} importorskip" for line in _calls(tree, "pytest.importorskip")]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.mark.skipif" and node.args:
                condition = ast.unparse(node.args[0])
                if not any(m in condition for m in MACHINE_CONDITIONS):
                    found.append(f"{path.name}:{node.lineno} skipif({condition})")
    assert found == []


def test_a_missing_module_skips_here_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_module_q3vl not installed"):
        skips.require("json", "no_such_module_q3vl")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        skips.require("no_such_module_q3vl")
    skips.require("json")  # present: nothing happens


def test_needs_keeps_the_fixtures_and_applies_the_rule(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    @skips.needs("no_such_module_q3vl")
    def needs_missing(tmp_path: Path) -> None:
        raise AssertionError("must not run")

    @skips.needs("json")
    def needs_json(tmp_path: Path) -> Path:
        return tmp_path

    assert list(inspect.signature(needs_json).parameters) == ["tmp_path"]  # pytest still injects it
    assert needs_json(tmp_path) == tmp_path
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception):
        needs_missing(tmp_path)
