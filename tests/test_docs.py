"""What the words say matches what the code does: the claims that went stale once (issue 16, defect 6)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
from skips import require

from qwen3_vl_service.media.workers import WORKERS_AUTO_MAX
from qwen3_vl_service.planning import vllm_versions

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "qwen3_vl_service"

# Imports and calls that mean I/O (files, sockets, processes, devices, the network).
IO_MODULES = {"os", "socket", "subprocess", "psutil", "pynvml", "requests", "aiohttp", "shutil", "tempfile"}
IO_METHODS = {"read_text", "read_bytes", "write_text", "write_bytes", "open", "stat", "exists", "is_dir"}


@pytest.mark.unit
def test_the_modules_the_readme_calls_pure_do_no_io() -> None:
    line = next(x for x in (REPO / "README.md").read_text().splitlines() if "(pure decisions" in x)
    names = re.findall(r"\b([a-z_]+)\b", line.split("qwen3_vl_service/")[-1].split("(")[0])
    assert names, line
    for name in names:
        (path,) = PACKAGE.rglob(f"{name}.py")
        tree = ast.parse(path.read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & IO_MODULES, (name, imported & IO_MODULES)
        calls = {
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
        }
        assert not calls & IO_METHODS, (name, calls & IO_METHODS)


@pytest.mark.unit
def test_every_mention_of_media_workers_auto_names_the_codes_limit() -> None:
    places = [REPO / "config.env", REPO / "README.md", *PACKAGE.rglob("*.py")]
    found = {
        (path.name, int(n))
        for path in places
        for n in re.findall(r"min\(CPUs[^()]*?,\s*(?:[\w.]+ = )?(\d+)\)", path.read_text(encoding="utf-8"))
    }
    assert found, "the auto rule is documented somewhere"
    assert {n for _, n in found} == {WORKERS_AUTO_MAX}, found


@pytest.mark.integration
def test_vllm_probe_returns_the_levels_its_docstring_names(tmp_path: Path) -> None:
    named = set(re.findall(r"'(ok|warn|error)'", vllm_versions.probe.__doc__ or ""))
    no_site = tmp_path / "python-without-site-packages"
    no_site.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    no_site.chmod(0o755)
    seen = {
        vllm_versions.probe(str(tmp_path / "missing-python")).level,  # not an executable file
        vllm_versions.probe(str(no_site)).level,  # runs, but finds no vLLM
    }
    require("vllm")
    seen.add(vllm_versions.probe(sys.executable).level)
    assert seen == named == {"ok", "warn", "error"}
