"""download_model.py against huggingface_hub's real download code and a local fake Hub.

The fake Hub (tests/fake_hub.py) stands in for huggingface.co at HF_ENDPOINT;
everything on the client side is the real thing: huggingface_hub's HfApi,
snapshot_download, its HTTP stack and resume logic, our CLI in a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from lifecycle_helpers import free_port
from skips import missing

sys.path.insert(0, str(Path(__file__).parent))
import realmodel
from fake_hub import FakeHub, FakeRepo, small_model_repo

from qwen3_vl_service.core.errors import CheckFailed, ConfigError
from qwen3_vl_service.core.units import format_decimal_bytes
from qwen3_vl_service.download import command, hub_errors
from qwen3_vl_service.download import hub as dl_hub
from qwen3_vl_service.download.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestFile,
    read_manifest,
    write_manifest,
)
from qwen3_vl_service.download.verify import verify
from qwen3_vl_service.planning import model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "download_model.py"
SHARD1, SHARD2, SHARD3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
GATED = "test-org/gated-vl"
GRANTED_TOKEN = "hf_GrantedSecretToken0123456789abcd"
UNGRANTED_TOKEN = "hf_ValidButNotGranted0123456789abc"
EXPIRED_TOKEN = "hf_ExpiredToken0123456789abcdefghi"


# ---------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def repo() -> FakeRepo:
    return small_model_repo()


@pytest.fixture
def hub(repo: FakeRepo) -> Iterator[FakeHub]:
    gated = small_model_repo(GATED, gated=True, granted_tokens=frozenset({GRANTED_TOKEN}))
    with FakeHub(repo, gated, valid_tokens=(UNGRANTED_TOKEN,)) as server:
        yield server


def clean_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """The environment of a user on a login node, minus anything that reaches the real Hub."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_")) and "proxy" not in k.lower()
    }
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf_home"),  # no login token of the machine, no shared cache
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def dl_args(repo_id: str, local_dir: Path, *more: str) -> list[str]:
    return ["--repo", repo_id, "--revision", "main", "--local-dir", str(local_dir), *more]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_matches_repo(local_dir: Path, repo: FakeRepo) -> None:
    for name, data in repo.files.items():
        assert (local_dir / name).read_bytes() == data, name


def partials(local_dir: Path) -> list[Path]:
    return list((local_dir / ".cache").rglob("*.incomplete")) if (local_dir / ".cache").exists() else []


def wait_for(predicate: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def finished_with_metadata(local_dir: Path, names: list[str]) -> bool:
    meta = local_dir / ".cache" / "huggingface" / "download"
    return all((local_dir / n).is_file() and (meta / f"{n}.metadata").is_file() for n in names)


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount a small tmpfs (a real small or read-only file system); skip where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(size: str, readonly: bool = False) -> Path:
        target = tmp_path / f"fs{len(mounted)}"
        target.mkdir()
        options = f"size={size}" + (",ro" if readonly else "")
        if shutil.which("mount") is None or os.geteuid() != 0:
            missing("mounting a tmpfs needs root")  # CI runs as root: a failure there
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True
        )
        if done.returncode != 0:
            missing(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


# ---------------------------------------------------------------------------
# Download: the full path, resume, interruption


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_full_download_writes_files_and_manifest_then_rerun_fetches_nothing(hub, repo, tmp_path):
    env = clean_env(tmp_path, hub.endpoint)
    target = tmp_path / "model"
    done = run_cli(dl_args(repo.repo_id, target), env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert_matches_repo(target, repo)
    assert not partials(target)
    for name in repo.files:
        assert hub.count("GET", name) == 1, name
    # The summary: files, bytes, time, rate; and the commit to pin.
    summary = next(line for line in done.stdout.splitlines() if line.startswith("done:"))
    assert "8 files, 3.6 MB" in summary and "fetched 8 files" in summary and "MB/s" in summary, summary
    assert f"MODEL_REVISION={repo.commit}" in done.stdout
    assert "Fetching 8 files" in done.stderr  # huggingface_hub's progress bar

    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert manifest["repo"] == repo.repo_id and manifest["revision"] == "main"
    assert manifest["commit"] == repo.commit
    entries = {f["name"]: f for f in manifest["files"]}
    assert set(entries) == set(repo.files)
    for name, data in repo.files.items():
        assert entries[name]["size"] == len(data)
        if name.endswith(".safetensors"):
            assert entries[name]["sha256"] == repo.etag(name)
        else:
            assert entries[name]["git_sha1"] == repo.etag(name)
    assert read_manifest(target) is not None and verify(target, deep=True) == []

    again = run_cli(dl_args(repo.repo_id, target), env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "fetched 0 files" in again.stdout and "8 already complete" in again.stdout
    for name in repo.files:
        assert hub.count("GET", name) == 1, name


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_dropped_connection_resumes_with_range_in_the_same_run(tmp_path):
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    # huggingface_hub writes in DOWNLOAD_CHUNK_SIZE (10 MiB) pieces and resumes from the last one written.
    big = small_model_repo(shard_sizes=(1_200_000, DOWNLOAD_CHUNK_SIZE + 600_000, 900_000))
    with FakeHub(big) as server:
        server.cut_once(SHARD2, after=DOWNLOAD_CHUNK_SIZE + 300_000)
        target = tmp_path / "model"
        done = run_cli(dl_args(big.repo_id, target), clean_env(tmp_path, server.endpoint), tmp_path)
        assert done.returncode == 0, done.stderr
        assert_matches_repo(target, big)
        ranges = [h.get("range") for p, h in server.resolve_gets() if p.endswith(SHARD2)]
    assert ranges == [None, f"bytes={DOWNLOAD_CHUNK_SIZE}-"]


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "slurm-sigterm"])
def test_interrupted_midway_then_rerun_fetches_only_the_unfinished_file(hub, repo, tmp_path, signum):
    hub.stall(SHARD2, after=700_000)
    env = clean_env(tmp_path, hub.endpoint)
    target = tmp_path / "model"
    others = [n for n in repo.files if n != SHARD2]
    proc = start_cli(dl_args(repo.repo_id, target), env, tmp_path)
    try:
        assert hub.stalled.wait(30), "the download never reached the stalled shard"
        wait_for(lambda: finished_with_metadata(target, others), what="the other files")
        assert partials(target), "the stalled shard should be in flight"
        # A second downloader into the same directory is refused while the first runs.
        second = run_cli(dl_args(repo.repo_id, target), env, tmp_path)
        assert second.returncode == 1
        assert "another download_model.py" in second.stderr
        started = time.monotonic()
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 5, "an interrupt must not wait for the files in flight"
    assert (
        f"interrupted ({signal.Signals(signum).name})" in err and "rerun download_model.py to resume" in err
    )
    assert "Traceback" not in err
    assert not partials(target) and not (target / SHARD2).exists()
    assert not (target / MANIFEST_NAME).exists()

    hub.release.set()
    resumed = run_cli(dl_args(repo.repo_id, target), env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_matches_repo(target, repo)
    assert "fetched 1 file," in resumed.stdout and "7 already complete" in resumed.stdout
    for name in others:
        assert hub.count("GET", name) == 1, f"{name} was fetched again"
    assert hub.count("GET", SHARD2) == 2
    assert verify(target, deep=True) == []


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_killed_midway_then_rerun_cleans_the_orphan_and_fetches_only_the_rest(hub, repo, tmp_path):
    hub.stall(SHARD3, after=400_000)
    env = clean_env(tmp_path, hub.endpoint)
    target = tmp_path / "model"
    others = [n for n in repo.files if n != SHARD3]
    proc = start_cli(dl_args(repo.repo_id, target), env, tmp_path)
    try:
        assert hub.stalled.wait(30)
        wait_for(lambda: finished_with_metadata(target, others), what="the other files")
        proc.kill()  # SIGKILL: no handler runs, like an OOM kill or a node failure
        proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    orphans = partials(target)
    assert orphans, "huggingface_hub's temporary file should be left behind"
    old = time.time() - 3600
    for p in orphans:
        os.utime(p, (old, old))
    hub.release.set()

    resumed = run_cli(dl_args(repo.repo_id, target), env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_matches_repo(target, repo)
    assert not partials(target), "the orphaned partial file should be cleaned up"
    for name in others:
        assert hub.count("GET", name) == 1, f"{name} was fetched again"
    assert hub.count("GET", SHARD3) == 2


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_network_failure_midway_says_rerun_resumes_and_the_rerun_does(hub, repo, tmp_path):
    hub.fail(SHARD1, after=300_000)
    env = clean_env(tmp_path, hub.endpoint)
    target = tmp_path / "model"
    failed = run_cli(dl_args(repo.repo_id, target), env, tmp_path)
    assert failed.returncode == 1
    (line,) = error_lines(failed.stderr)
    assert "network failure" in line and "a rerun resumes where this one stopped" in line, line
    assert "Traceback" not in failed.stderr

    hub.faults.clear()
    resumed = run_cli(dl_args(repo.repo_id, target), env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_matches_repo(target, repo)
    for name in repo.files:
        if name != SHARD1:
            assert hub.count("GET", name) == 1, f"{name} was fetched again"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_hub_unreachable_is_one_line_with_rerun_hint(tmp_path):
    env = clean_env(tmp_path, f"http://127.0.0.1:{free_port()}")
    done = run_cli(dl_args("test-org/tiny-vl", tmp_path / "model"), env, tmp_path)
    assert done.returncode == 1
    (line,) = error_lines(done.stderr)
    assert "network failure" in line and "a rerun resumes" in line, line
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------------------
# Access: gated, tokens, not found


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_gated_repo_without_token_says_what_to_do_and_writes_nothing(hub, tmp_path):
    target = tmp_path / "model"
    done = run_cli(dl_args(GATED, target), clean_env(tmp_path, hub.endpoint), tmp_path)
    assert done.returncode == 1
    (line,) = error_lines(done.stderr)
    assert f"{GATED} is a gated repo and no Hugging Face token was found (HTTP 401)" in line, line
    assert "accept its conditions" in line and "HF_TOKEN" in line and "hf auth login" in line
    assert "Traceback" not in done.stderr
    assert hub.resolve_gets() == [] and not target.exists()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_gated_repo_token_without_access_is_403(hub, tmp_path):
    env = clean_env(tmp_path, hub.endpoint, HF_TOKEN=UNGRANTED_TOKEN)
    done = run_cli(dl_args(GATED, tmp_path / "model"), env, tmp_path)
    assert done.returncode == 1
    (line,) = error_lines(done.stderr)
    assert "the token from HF_TOKEN has not been granted access (HTTP 403)" in line, line
    assert UNGRANTED_TOKEN not in done.stdout + done.stderr


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_expired_token_is_named_by_source_not_value(hub, repo, tmp_path):
    env = clean_env(tmp_path, hub.endpoint, HF_TOKEN=EXPIRED_TOKEN)
    done = run_cli(dl_args(repo.repo_id, tmp_path / "model"), env, tmp_path)
    assert done.returncode == 1
    (line,) = error_lines(done.stderr)
    assert "rejected the token from HF_TOKEN (HTTP 401: expired" in line and "settings/tokens" in line, line
    assert EXPIRED_TOKEN not in done.stdout + done.stderr


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_gated_repo_with_token_downloads_and_the_token_is_never_shown(hub, tmp_path):
    logs = tmp_path / "logs"
    target = tmp_path / "model"
    config = tmp_path / "config.env"
    config.write_text(f"MODEL_PATH={target}\nMODEL_REPO={GATED}\nMODEL_REVISION=main\nLOG_DIR={logs}\n")
    env = clean_env(tmp_path, hub.endpoint, HF_TOKEN=GRANTED_TOKEN)
    done = run_cli(["--config", str(config)], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "token: from HF_TOKEN" in done.stdout
    assert f"Bearer {GRANTED_TOKEN}" in hub.authorization_headers()  # it was used...
    failed = run_cli(["--config", str(config), "--revision", "no-such-branch"], env, tmp_path)
    assert failed.returncode == 2 and "revision 'no-such-branch' not found" in failed.stderr
    log_text = (logs / "download.log").read_text()
    assert "download start" in log_text and "done:" in log_text and "download failed" in log_text
    # ...and never printed or logged.
    for text in (done.stdout, done.stderr, failed.stdout, failed.stderr, log_text):
        assert GRANTED_TOKEN not in text
    for path in target.rglob("*"):
        if path.is_file():
            assert GRANTED_TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_repo_not_found(hub, tmp_path):
    done = run_cli(
        dl_args("test-org/no-such-model", tmp_path / "model"), clean_env(tmp_path, hub.endpoint), tmp_path
    )
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert "repo test-org/no-such-model not found" in line and "MODEL_REPO" in line, line
    assert not (tmp_path / "model").exists()


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.parametrize("repo_id", ["not a repo", "a/b/c"])
def test_a_malformed_repo_flag_gets_the_settings_check(hub, tmp_path, repo_id):
    done = run_cli(dl_args(repo_id, tmp_path / "model"), clean_env(tmp_path, hub.endpoint), tmp_path)
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert f"--repo={repo_id!r} is invalid" in line and "Hugging Face repo id" in line, line
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------------------
# Disk space and writability


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_too_little_space_is_refused_before_any_byte_is_written(hub, repo, tmp_path):
    target = tmp_path / "model"
    small = SimpleNamespace(total=10**9, used=10**9 - 500_000_000, free=500_000_000)
    with pytest.raises(hub_errors.DownloadFailed) as info:
        dl_hub.download(
            repo.repo_id, "main", target, endpoint=hub.endpoint, token=False, disk_usage=lambda p: small
        )
    message = info.value.one_line()
    assert "not enough space" in message and "3.6 MB still to fetch (+1.1 GB margin)" in message, message
    assert "only 500 MB free" in message and "MODEL_PATH" in message
    assert hub.resolve_gets() == []
    assert not target.exists()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_space_check_counts_files_already_there(hub, repo, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / SHARD2).write_bytes(repo.files[SHARD2])
    plan = dl_hub.plan_download(repo.repo_id, "main", target, endpoint=hub.endpoint, token=False)
    assert plan.commit == repo.commit
    assert plan.present == {SHARD2}
    assert plan.needed == sum(len(d) for d in repo.files.values()) - len(repo.files[SHARD2])
    assert plan.fits


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_too_little_space_on_a_real_small_file_system(hub, repo, tmp_path, mount_tmpfs):
    fs = mount_tmpfs("2m")
    done = run_cli(dl_args(repo.repo_id, fs / "model"), clean_env(tmp_path, hub.endpoint), tmp_path)
    assert done.returncode == 1
    (line,) = error_lines(done.stderr)
    assert "not enough space" in line and "3.6 MB still to fetch" in line, line
    assert hub.resolve_gets() == [] and not (fs / "model").exists()


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:Not enough free disk space")  # huggingface_hub's own warning
def test_disk_filling_up_midway_says_what_is_left(hub, repo, tmp_path, mount_tmpfs):
    fs = mount_tmpfs("2m")
    plenty = SimpleNamespace(total=10**12, used=0, free=10**12)  # someone else fills it meanwhile
    calls = []

    def disk_usage(path):
        calls.append(path)
        return plenty if len(calls) == 1 else shutil.disk_usage(path)

    with pytest.raises(hub_errors.DownloadFailed) as info:
        dl_hub.download(
            repo.repo_id, "main", fs / "model", endpoint=hub.endpoint, token=False, disk_usage=disk_usage
        )
    message = info.value.one_line()
    assert message.startswith("disk full while downloading"), message
    assert "left on its file system" in message and "a rerun resumes" in message


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_read_only_target_is_refused(hub, repo, tmp_path, mount_tmpfs):
    fs = mount_tmpfs("4g", readonly=True)
    done = run_cli(dl_args(repo.repo_id, fs / "model"), clean_env(tmp_path, hub.endpoint), tmp_path)
    assert done.returncode == 1
    (line,) = error_lines(done.stderr)
    assert "cannot write the model to" in line and "Read-only file system" in line, line


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_target_under_a_file_is_refused(hub, repo, tmp_path):
    (tmp_path / "afile").write_text("x")
    done = run_cli(
        dl_args(repo.repo_id, tmp_path / "afile" / "model"), clean_env(tmp_path, hub.endpoint), tmp_path
    )
    assert done.returncode == 1
    (line,) = error_lines(done.stderr)
    assert "cannot write the model to" in line and "Not a directory" in line, line


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_target_without_write_permission_is_refused(hub, repo, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        done = run_cli(dl_args(repo.repo_id, locked / "model"), clean_env(tmp_path, hub.endpoint), tmp_path)
    finally:
        locked.chmod(0o700)
    assert done.returncode == 1 and "Permission denied" in done.stderr


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_dry_run_lists_and_measures_without_downloading(hub, repo, tmp_path):
    done = run_cli(
        dl_args(repo.repo_id, tmp_path / "model", "--dry-run"), clean_env(tmp_path, hub.endpoint), tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert f"commit {repo.commit[:12]}): 8 files, 3.6 MB" in done.stdout and "it fits" in done.stdout
    assert hub.resolve_gets() == [] and not (tmp_path / "model").exists()


# ---------------------------------------------------------------------------
# --verify / --verify --deep, offline


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> Path:
    """One real download, copied by each verify test."""
    repo = small_model_repo()
    place = tmp_path_factory.mktemp("downloaded")
    with FakeHub(repo) as server:
        dl_hub.download(repo.repo_id, "main", place / "model", endpoint=server.endpoint, token=False)
    return place / "model"


@pytest.fixture
def model_copy(downloaded, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(downloaded, target)
    return target


def verify_cli(target: Path, tmp_path: Path, *more: str) -> subprocess.CompletedProcess:
    # A compute node: no Hub, offline mode on.
    env = clean_env(tmp_path, f"http://127.0.0.1:{free_port()}", HF_HUB_OFFLINE="1")
    return run_cli(dl_args("test-org/tiny-vl", target, "--verify", *more), env, tmp_path)


def flip_byte(path: Path, offset: int) -> None:
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot: same size, same mtime


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_verify_passes_on_a_good_copy_offline(model_copy, tmp_path):
    for extra in ([], ["--deep"]):
        done = verify_cli(model_copy, tmp_path, *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "matches its manifest" in done.stdout


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_verify_catches_a_missing_file(model_copy, tmp_path):
    (model_copy / SHARD2).unlink()
    done = verify_cli(model_copy, tmp_path)
    assert done.returncode == 1
    assert f"problem: {SHARD2}: missing (1.5 MB expected)" in done.stdout
    (line,) = error_lines(done.stderr)
    assert "1 problem(s)" in line and "rerun download_model.py" in line


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_verify_catches_a_truncated_file(model_copy, tmp_path):
    with open(model_copy / SHARD1, "r+b") as fh:
        fh.truncate(1_000_000)
    done = verify_cli(model_copy, tmp_path)
    assert done.returncode == 1
    assert f"{SHARD1}: 1000000 bytes, expected 1200000 (truncated)" in done.stdout


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_verify_deep_catches_a_flipped_byte_that_sizes_miss(model_copy, tmp_path):
    flip_byte(model_copy / SHARD3, 123_456)
    flip_byte(model_copy / "config.json", 3)
    shallow = verify_cli(model_copy, tmp_path)
    assert shallow.returncode == 0, shallow.stdout
    deep = verify_cli(model_copy, tmp_path, "--deep")
    assert deep.returncode == 1
    assert f"problem: {SHARD3}: sha256 " in deep.stdout and "(corrupt); delete the file" in deep.stdout
    assert "problem: config.json: git sha1 " in deep.stdout
    assert "2 problem(s)" in deep.stderr
    problems = verify(model_copy, deep=True)
    assert len(problems) == 2


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_verify_without_or_with_a_damaged_manifest(model_copy, tmp_path):
    (model_copy / MANIFEST_NAME).write_text("{not json")
    done = verify_cli(model_copy, tmp_path)
    assert done.returncode == 1 and "is damaged" in error_lines(done.stderr)[0]
    with pytest.raises(CheckFailed, match="is damaged"):
        read_manifest(model_copy)
    (model_copy / MANIFEST_NAME).unlink()
    assert read_manifest(model_copy) is None
    done = verify_cli(model_copy, tmp_path)
    # Without a manifest: the index and each shard's header (this fake repo's shards are random bytes).
    assert done.returncode == 1 and f"no {MANIFEST_NAME}: checked against" in done.stdout
    assert f"problem: {SHARD1}: not a safetensors file" in done.stdout
    assert verify(tmp_path / "nowhere") == [
        f"model directory {tmp_path / 'nowhere'} does not exist; run download_model.py"
    ]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_verify_agrees_with_the_preflight_on_a_folder_without_a_manifest(tmp_path):
    """Issue 24, item 5: a copy the preflight calls complete (no manifest: copied, or `hf download`)
    passes --verify, checked the preflight's way; a shard cut short fails both."""
    folder = realmodel.build(tmp_path / "copied", shards=4)  # sparse shards: sizes real, blocks not
    assert model.inspect(folder).errors == ()
    done = verify_cli(folder, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"no {MANIFEST_NAME}: checked against model.safetensors.index.json" in done.stdout
    assert done.stdout.rstrip().endswith("matches its index and safetensors headers")
    deep = verify_cli(folder, tmp_path, "--deep")
    assert deep.returncode == 1 and "so no hashes to compare the files with" in deep.stdout
    shard = folder / realmodel.shard_name(2, 4)
    os.truncate(shard, shard.stat().st_size - 10)
    assert model.inspect(folder).errors
    cut = verify_cli(folder, tmp_path)
    assert cut.returncode == 1
    assert f"problem: {shard.name}: {shard.stat().st_size} bytes, its safetensors header says" in cut.stdout


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_failed_dry_run_is_not_logged_as_a_failed_download(hub, repo, tmp_path):
    args = ["--repo", repo.repo_id, "--revision", "no-such-branch", "--local-dir", str(tmp_path / "m")]
    done = run_cli([*args, "--dry-run"], clean_env(tmp_path, hub.endpoint), tmp_path)
    assert done.returncode == 2 and "revision 'no-such-branch' not found" in done.stderr
    log_text = (tmp_path / "logs" / "download.log").read_text()
    assert "dry run (nothing downloaded): " in log_text and "download failed" not in log_text


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_verify_flags_a_manifest_of_another_repo_or_commit(model_copy):
    manifest = read_manifest(model_copy)
    assert verify(model_copy, expect_repo=manifest.repo, expect_revision=manifest.commit) == []
    assert verify(model_copy, expect_revision="main") == []  # a branch cannot be checked offline
    problems = verify(model_copy, expect_repo="Qwen/other", expect_revision="a" * 40)
    assert len(problems) == 2 and "MODEL_REPO=Qwen/other" in problems[0] and "MODEL_REVISION=" in problems[1]


# ---------------------------------------------------------------------------
# Unit tests: no network


@pytest.mark.unit
def test_manifest_round_trip_is_atomic(tmp_path):
    manifest = Manifest(
        repo="a/b",
        revision="main",
        commit="c" * 40,
        created="2025-01-01T00:00:00+00:00",
        files=(
            ManifestFile("x.safetensors", 3, sha256="d" * 64),
            ManifestFile("sub/y.json", 2, git_sha1="e" * 40),
        ),
    )
    write_manifest(tmp_path, manifest)
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]  # no temporary file left
    assert read_manifest(tmp_path) == manifest
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["total_bytes"] == 5


@pytest.mark.unit
@pytest.mark.parametrize("name", ["../etc/passwd", "/abs", "a/../../b", "a\\b", ""])
def test_manifest_names_must_stay_inside_the_directory(tmp_path, name):
    data = {
        "format": 1,
        "repo": "a/b",
        "revision": "main",
        "commit": "c" * 40,
        "files": [{"name": name, "size": 1}],
    }
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(CheckFailed, match="is damaged"):
        read_manifest(tmp_path)


@pytest.mark.unit
def test_os_errors_become_one_line_with_the_fix(tmp_path):
    ctx = hub_errors.HubContext("a/b", "main", "https://hub", tmp_path / "m", remaining=5 * 10**9)
    full = hub_errors.translate(OSError(errno.ENOSPC, "No space left on device"), ctx)
    assert (
        full is not None and "disk full" in full.one_line() and "5 GB were still to fetch" in full.one_line()
    )
    quota = hub_errors.translate(OSError(errno.EDQUOT, "Disk quota exceeded"), ctx)
    assert quota is not None and "disk full" in quota.one_line()
    denied = hub_errors.translate(
        PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "m")), ctx
    )
    assert denied is not None and denied.one_line().startswith(f"cannot write the model to {tmp_path / 'm'}")
    assert hub_errors.translate(ValueError("something else"), ctx) is None


@pytest.mark.unit
def test_space_arithmetic_and_units(tmp_path):
    files = (ManifestFile("a", 10 * 10**9), ManifestFile("b", 5 * 10**9))
    plan = dl_hub.Plan("a/b", "main", "c" * 40, files, frozenset({"a"}), tmp_path, tmp_path, 6_100_000_000, 0)
    assert plan.needed == 5 * 10**9 and plan.margin == 1 << 30 and plan.fits
    assert not dataclasses_replace(plan, free=5 * 10**9).fits
    assert dataclasses_replace(plan, free=5 * 10**9, reclaimable=2 * 10**9).fits
    assert format_decimal_bytes(236_123_456_789) == "236.1 GB" and format_decimal_bytes(512) == "512 B"
    assert hub_errors.nearest_existing_dir(tmp_path / "x" / "y") == tmp_path


def dataclasses_replace(plan, **changes):
    import dataclasses

    return dataclasses.replace(plan, **changes)


@pytest.mark.unit
def test_bad_usage_and_bad_config_exit_2(tmp_path):
    assert (
        command.main(["--local-dir", str(tmp_path), "--repo", "a/b", "--revision", "main", "--workers", "0"])
        == 2
    )
    assert (
        command.main(
            ["--local-dir", str(tmp_path), "--repo", "a/b", "--revision", "x", "--dry-run", "--verify"]
        )
        == 2
    )
    assert command.main(["--config", str(tmp_path / "missing.env")]) == 2
    with pytest.raises(ConfigError):
        command._settings(command._parser().parse_args(["--config", str(tmp_path / "missing.env")]))


@pytest.mark.unit
def test_importing_the_module_pulls_in_no_hub_torch_or_vllm():
    code = (
        "import sys, qwen3_vl_service.download as d; "
        "bad = [m for m in ('huggingface_hub', 'torch', 'vllm', 'transformers') if m in sys.modules]; "
        "sys.exit(repr(bad) if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.unit
def test_the_script_is_two_lines():
    assert SCRIPT.read_text().splitlines() == [
        "from qwen3_vl_service.download.command import main",
        "raise SystemExit(main())",
    ]
