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
    line = next(x for x in (REPO / "README.md").read_text().splitlines() if "pure (no I/O" in x)
    names = re.findall(r"\b([a-z_]+)\b", line.split("):", 1)[1])
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


# -- the new user's path (issue 24): the README's commands as written, its contents, its claims ------

CODE_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
# The README's commands that start nothing: run as written, in the checkout, with the service's
# folders, ports and model folder pointed into a temp dir through the environment (which config.env
# lets override every setting), so a service of this checkout is never touched.
RUN_AS_WRITTEN = {
    ".venv/bin/python start_service.py --dry-run --gpus 8xH100-80GB": 0,
    "REPLICAS=2 TENSOR_PARALLEL_SIZE=4 .venv/bin/python start_service.py --dry-run --gpus 8xH100-80GB": 0,
    "PROFILE=long-context .venv/bin/python start_service.py --dry-run --gpus 8xH100-80GB": 0,
    # Every node's commands from the shipped config.env (REPLICAS=per-node; issue 24, item 2).
    ".venv/bin/python start_service.py --dry-run --gpus 8xH100-80GB --nodes gpu01,gpu02": 0,
    ".venv/bin/python status_service.py": 1,  # not running: exit 1, as documented
    ".venv/bin/python status_service.py --config config.bf16.env": 1,
    ".venv/bin/python stop_service.py --all": 0,  # nothing to stop
    ".venv/bin/python stop_service.py --config config.bf16.env --all": 0,
    ".venv/bin/python download_model.py --verify": 1,  # nothing downloaded: one line, exit 1
    ".venv/bin/python download_model.py --verify --deep": 1,
    ".venv/bin/python download_model.py --dry-run": 0,  # against a stand-in of the Hub
}
# The others, and why not here (each is exercised by the test named).
NOT_RUN = {
    "python3 -m venv .venv && .venv/bin/pip install -e '.[gpu,router]'": "installs from the network",
    ".venv/bin/python download_model.py": "fetches 238 GB (test_download.py, against a stand-in Hub)",
    ".venv/bin/python start_service.py": "starts vLLM (test_e2e.py)",
    '.venv/bin/python -m qwen3_vl_service.lifecycle.ask "What is in this picture?" --image cat.jpg': (
        "needs a running service (test_e2e.py)"
    ),
    ".venv/bin/python batch_service.py [--config F] IN.jsonl OUT.jsonl": "a synopsis; needs a service",
    "REPLICAS=2 TENSOR_PARALLEL_SIZE=4 .venv/bin/python start_service.py --detach": (
        "starts two vLLM (test_slurm_multi_e2e.py)"
    ),
    ".venv/bin/python start_service.py --config config.bf16.env --detach": (
        "starts vLLM (test_services_e2e.py)"
    ),
}


def _readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def readme_python_commands() -> list[str]:
    """Every command line of the README's code blocks that runs python (comments cut off)."""
    found = []
    for _lang, body in CODE_BLOCK.findall(_readme()):
        for raw in body.splitlines():
            line = raw.strip().removeprefix("$ ")
            command = re.split(r"\s+#", line)[0].strip()
            if command and not command.startswith("#") and re.search(r"(^|\s|/)python3?\s", command):
                found.append(command)
    return found


@pytest.mark.unit
def test_every_readme_command_is_run_here_or_says_why_not() -> None:
    commands = set(readme_python_commands())
    assert commands, "the README has commands"
    assert commands <= set(RUN_AS_WRITTEN) | set(NOT_RUN), commands - set(RUN_AS_WRITTEN) - set(NOT_RUN)
    assert set(RUN_AS_WRITTEN) <= commands, set(RUN_AS_WRITTEN) - commands


@pytest.mark.unit
def test_readme_commands_use_the_venv_python() -> None:
    """A bare `python` outside .venv fails with ModuleNotFoundError (psutil): every later command says
    .venv/bin/python, in code blocks and in the text, and so does every fix the service prints."""
    bare = re.compile(r"(?<![/\w.-])python (?=\S+\.py\b|-m (?:qwen3_vl_service|devtools)\b)")
    assert [line for line in _readme().splitlines() if bare.search(line)] == []
    shown = [
        "config.env",
        "config.demo.env",
        "config.bf16.env",
        "slurm/serve.sbatch",
        "slurm/serve_multi.sbatch",
    ]
    shown += [str(p.relative_to(REPO)) for p in sorted((REPO / "qwen3_vl_service").rglob("*.py"))]
    for name in shown:
        text = (REPO / name).read_text(encoding="utf-8")
        assert [line for line in text.splitlines() if bare.search(line)] == [], name
    assert "python3 -m venv .venv" in _readme()  # the one command that must use the system python


def _hub_for_download_dry_run(stack, env: dict[str, str]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from fake_hub import FakeHub, small_model_repo

    from qwen3_vl_service.settings import config

    repo = config.load(REPO / "config.env", environ={}).model_repo
    hub = stack.enter_context(FakeHub(small_model_repo(repo)))
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=env["RUN_DIR"] + "-hf", HF_HUB_DISABLE_TELEMETRY="1")
    env["NO_PROXY"] = "127.0.0.1,localhost"


@pytest.mark.integration
def test_the_readmes_commands_that_start_nothing_run_as_written(tmp_path: Path) -> None:
    import contextlib
    import os
    import subprocess

    from lifecycle_helpers import free_port

    # Replicas listen on PORT + i: the other ports kept well apart from it (a clash is refused).
    ports = [free_port()]
    while len(ports) < 3:
        candidate = free_port()
        if all(abs(candidate - p) > 16 for p in ports):
            ports.append(candidate)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "QWEN3_VL_")) and k != "CONFIG"}
    env.update(
        RUN_DIR=str(tmp_path / "run"),
        LOG_DIR=str(tmp_path / "logs"),
        MODEL_PATH=str(tmp_path / "models" / "not-downloaded"),
        PORT=str(ports[0]),
        MEDIA_PORT=str(ports[1]),
        ROUTER_PORT=str(ports[2]),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    outputs = {}
    with contextlib.ExitStack() as stack:
        _hub_for_download_dry_run(stack, env)
        for command, code in RUN_AS_WRITTEN.items():
            done = subprocess.run(
                ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == code, f"{command}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
            assert "Traceback" not in done.stdout + done.stderr, command
            outputs[command] = done.stdout
    plan = outputs[".venv/bin/python start_service.py --dry-run --gpus 8xH100-80GB"]
    # The README's capacity block is what this command prints before the download.
    block = _readme().split("## Capacity: what fits on 8 x H100 80GB", 1)[1].split("```")[1]
    for number in re.findall(r"= ([\d,]+(?:\.\d+)?) (?:GiB per GPU|B per GPU)|= ([\d,]{7,})$", block, re.M):
        shown = number[0] or number[1]
        assert shown in plan, f"README says {shown}; the dry run printed:\n{plan}"
    assert "expert parallel on" in plan and "--enable-expert-parallel" in plan
    assert plan.rstrip().endswith("would start: once the model is downloaded (download_model.py)")
    assert "it fits" in outputs[".venv/bin/python download_model.py --dry-run"]


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.unit
def test_the_contents_link_every_section_and_the_first_screen_is_how_to_run_it() -> None:
    text = _readme()
    anchors = {_slug(h) for h in re.findall(r"^#{2,3} (.+)$", text, re.M)}
    contents = text.split("**Contents:**", 1)[1].split("\n\n", 1)[0]
    links = re.findall(r"\]\(([^)]+)\)", contents)
    assert len(links) >= 15
    for link in links:
        if link.startswith("#"):
            assert link[1:] in anchors, link
        else:
            assert (REPO / link).is_file(), link
    assert {_slug(h) for h in re.findall(r"^## (.+)$", text, re.M)} <= {link[1:] for link in links} | {
        "benchmarks"
    }
    # What comes first is how to run it: the demo, then the cluster commands, before anything else.
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[:2] == ["The first two commands", "On the cluster"], headings[:3]
    first = text.split("\n### Requests", 1)[0]
    assert "bash scripts/demo.sh" in first and "start_service.py --dry-run --gpus 8xH100-80GB" in first
    assert "tok/s" not in text and "TPOT" not in text, "benchmark tables live in docs/benchmarks.md"
    bench = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert "bench/bench_startup.py" in bench and "| concurrency | out tok/s |" in bench
    assert "(docs/benchmarks.md)" in text


@pytest.mark.unit
def test_the_table_for_users_of_the_bash_service_maps_every_piece_to_what_exists() -> None:
    from qwen3_vl_service.settings import config, profiles

    table = _readme().split("## Coming from the original bash service", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:]
    firsts = " ".join(r.split(" | ")[0] for r in rows)
    for piece in ("config.env", "start_service.sh", "stop_service.sh", "download_model.sh", "8080", "8010",
                  "qwen3-vl-fp8", "tuning recipes", "YaRN", "BF16 model on 7001"):  # fmt: skip
        assert piece in firsts, piece
    cfg = config.load(REPO / "config.env", environ={})
    assert (cfg.port, cfg.media_port, cfg.served_model_name) == (8010, 8080, "qwen3-vl-fp8")
    assert config.load(REPO / "config.bf16.env", environ={}).port == 7001
    for name in re.findall(r"`PROFILE=([\w-]+)`", table) + re.findall(
        r"`(long-context|low-latency|creative)`", table
    ):
        assert name in profiles.PROFILES, name
    for script in re.findall(r"`\.venv/bin/python (\w+\.py)", table):
        assert (REPO / script).is_file(), script


@pytest.mark.unit
def test_gpus_are_asked_for_one_way_in_the_readme_the_sbatch_header_and_the_fix_texts() -> None:
    """salloc in the README, #SBATCH in serve.sbatch and the preflight's fixes: --gpus-per-node."""
    sbatch = (REPO / "slurm" / "serve.sbatch").read_text(encoding="utf-8")
    assert "#SBATCH --gpus-per-node=8" in sbatch
    salloc = [line for line in _readme().splitlines() if line.lstrip().startswith("salloc ")]
    assert salloc and all("--gpus-per-node=8" in line and "--gres" not in line for line in salloc)
    for path in PACKAGE.rglob("*.py"):
        for fix in re.findall(r"salloc [^\"']*", path.read_text(encoding="utf-8")):
            assert "--gres" not in fix and "--gpus=" not in fix, (path.name, fix)
