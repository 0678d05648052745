"""The interconnect check: sizes and bandwidth maths, NVML topology (faked), findings, and real workers.

The integration tests run the real code path (process spawn, rendezvous,
all-reduce, check, timing, timeout and kill) with torch's gloo backend on CPU.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pynvml
import pytest
from lifecycle_helpers import wait_until
from skips import needs

from qwen3_vl_service.core.errors import UsageError
from qwen3_vl_service.interconnect import command, report, run, topology
from qwen3_vl_service.machine import gpus
from qwen3_vl_service.machine.gpus import NvmlUnavailable
from qwen3_vl_service.settings.config import load

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# A fake NVML: the hardware edge


class FakeNvml:
    """pynvml's functions for N GPUs; NVSwitch (all NVLink), or PCIe only."""

    NVML_NVLINK_MAX_LINKS = 36

    # pynvml's own error classes, so that gpus.nvml_session tells them apart as with the real library.
    NVMLError = pynvml.NVMLError
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded

    def __init__(
        self,
        n=8,
        *,
        links=18,
        down=None,
        nvswitch=True,
        p2p=0,
        ancestor=50,
        name="NVIDIA H100 80GB HBM3",
        cc=(9, 0),
        init_error=None,
    ):
        self.n, self.links, self.down = n, links, down or {}
        self.nvswitch, self.p2p_status, self.ancestor = nvswitch, p2p, ancestor
        self.name, self.cc, self.init_error = name, cc, init_error
        self.shut = False

    def nvmlInit(self):
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h:04d}aaaa-0000"

    def nvmlSystemGetDriverVersion(self):
        return "570.00"

    def nvmlDeviceGetName(self, h):
        return self.name

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=f"00000000:{0x18 + h:02X}:00.0".encode())

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return self.cc

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h):
        return 5

    def nvmlDeviceGetMaxPcieLinkWidth(self, h):
        return 16

    def nvmlDeviceGetNvLinkState(self, h, link):
        if link >= self.links:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 0 if link < self.down.get(h, 0) else 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        return SimpleNamespace(busId=f"00000000:{0xA0 + link % 4:02X}:00.0".encode())  # an NVSwitch

    def nvmlDeviceGetP2PStatus(self, a, b, index):
        if index == 2:
            return 0 if self.nvswitch and self.links else 5
        return self.p2p_status

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return self.ancestor


def _cfg(tmp_path, monkeypatch, **env):
    monkeypatch.chdir(tmp_path)
    environ = {"LOG_DIR": str(tmp_path / "logs"), **env}
    return load(None, environ=environ)


def _no_torch_python(tmp_path) -> str:
    script = tmp_path / "python-without-torch"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _leftovers(run_id: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if run_id in " ".join(p.info["cmdline"] or ()) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


# ---------------------------------------------------------------------------
# Pure helpers


@pytest.mark.unit
def test_parse_sizes_binary_units_and_errors():
    assert run.parse_sizes("1M,16M,256M") == (1 << 20, 16 << 20, 256 << 20)
    assert run.parse_sizes("64K, 1MiB,4096, 1G") == (64 << 10, 1 << 20, 4096, 1 << 30)
    assert run.parse_sizes("10") == (8,)  # whole float32 elements
    for bad in ("", "12Q", "0", "16G"):
        with pytest.raises(UsageError):
            run.parse_sizes(bad)


@pytest.mark.unit
def test_bus_bandwidth_follows_nccl_tests():
    assert run.bus_bandwidth(100.0, 8) == pytest.approx(175.0)
    assert run.bus_bandwidth(100.0, 2) == pytest.approx(100.0)
    assert run.bus_bandwidth(100.0, 1) == 0.0
    s = run.SizeResult(nbytes=256 << 20, iters=10, time_s=1e-3)
    assert s.algbw == pytest.approx(268.435456)
    assert s.busbw(8) == pytest.approx(268.435456 * 14 / 8)


@pytest.mark.unit
def test_visible_indices_follow_cuda_visible_devices():
    uuids = [f"GPU-{i}abc" for i in range(4)]
    assert topology.visible_indices({}, uuids) == [0, 1, 2, 3]
    assert topology.visible_indices({"CUDA_VISIBLE_DEVICES": "2,3"}, uuids) == [2, 3]
    assert topology.visible_indices({"CUDA_VISIBLE_DEVICES": "GPU-3"}, uuids) == [3]
    assert topology.visible_indices({"CUDA_VISIBLE_DEVICES": "1,9,0"}, uuids) == [
        1
    ]  # CUDA stops at the bad entry
    assert topology.visible_indices({"CUDA_VISIBLE_DEVICES": ""}, uuids) == []


@pytest.mark.unit
def test_worker_env_turns_nvls_off_unless_set():
    env = run.worker_env({"PATH": "/bin"}, {"NCCL_P2P_LEVEL": "NVL"})
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["NCCL_P2P_LEVEL"] == "NVL"
    assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep)
    assert run.worker_env({"NCCL_NVLS_ENABLE": "1"})["NCCL_NVLS_ENABLE"] == "1"
    assert run.worker_env({}, {"NCCL_NVLS_ENABLE": "1"})["NCCL_NVLS_ENABLE"] == "1"


@pytest.mark.unit
def test_module_does_not_import_torch():
    code = "import sys, qwen3_vl_service.interconnect; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------
# Topology (fake NVML)


@pytest.mark.unit
def test_topology_h100_nvswitch():
    nv = FakeNvml(8)
    topo = topology.read_topology({}, nvml=nv)
    assert nv.shut
    assert len(topo.gpus) == 8 and topo.all_nvlink
    assert topo.links[0] == ("X", *["NV18"] * 7)
    assert topo.nominal() == (450.0, "NVLink4: 18 links x 25 GB/s")
    text = topology.render_topology(topo)
    assert "GPU7" in text and "NV18" in text and "450 GB/s" in text
    notes = report.topology_findings(topo)
    assert [n.level for n in notes] == ["ok"]
    assert "NVLink between every pair" in notes[0].message


@pytest.mark.unit
def test_topology_subset_and_visible_devices():
    topo = topology.read_topology({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, nvml=FakeNvml(8))
    assert [g.index for g in topo.gpus] == [4, 5, 6, 7]
    assert [g.index for g in topo.subset(2).gpus] == [4, 5]
    assert topo.subset(1).nominal() is None


@pytest.mark.unit
def test_topology_flags_a_down_nvlink():
    topo = topology.read_topology({}, nvml=FakeNvml(8, down={3: 2}))
    assert topo.gpus[3].nvlinks_active == 16 and topo.gpus[3].nvlinks_supported == 18
    notes = report.topology_findings(topo)
    down = [n for n in notes if "NVLinks down" in n.message]
    assert down and down[0].level == "warn" and "GPU3 16/18" in down[0].message
    assert "nvidia-smi nvlink -s" in down[0].fix
    assert topo.nominal()[0] == 16 * 25.0  # the slowest GPU sets the ring's pace


@pytest.mark.unit
def test_topology_pcie_with_p2p_disabled():
    topo = topology.read_topology({}, nvml=FakeNvml(4, links=0, nvswitch=False, p2p=4, ancestor=50))
    assert not topo.all_nvlink
    assert topo.links[0] == ("X", "SYS", "SYS", "SYS")
    value, what = topo.nominal()
    assert what == "PCIe Gen5 x16" and value == pytest.approx(63.0, rel=0.01)
    notes = report.topology_findings(topo)
    assert any(n.level == "warn" and "disabled by regkey" in n.message for n in notes)
    assert "P2P not available" in topology.render_topology(topo)


@pytest.mark.unit
def test_topology_unavailable_without_driver():
    with pytest.raises(NvmlUnavailable, match="no NVIDIA driver"):
        topology.read_topology({}, nvml=FakeNvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    with pytest.raises(NvmlUnavailable, match="no GPU"):
        topology.read_topology({}, nvml=FakeNvml(0))
    with pytest.raises(NvmlUnavailable, match="no GPU is visible"):
        topology.read_topology({"CUDA_VISIBLE_DEVICES": ""}, nvml=FakeNvml(2))


# ---------------------------------------------------------------------------
# Findings


def _result(status="ok", world=8, **kw):
    base = {
        "backend": "nccl",
        "world_size": world,
        "timeout_s": 120.0,
        "nccl_version": "2.27.3",
        "elapsed_s": 9.5,
    }
    return run.CheckResult(status=status, **{**base, **kw})


@pytest.mark.unit
def test_notes_healthy_nvlink_bandwidth():
    topo = topology.read_topology({}, nvml=FakeNvml(8))
    # 256 MiB in 1.3 ms: algbw 206 GB/s, busbw 361 GB/s = 80% of 450.
    sizes = (run.SizeResult(1 << 20, 50, 40e-6), run.SizeResult(256 << 20, 16, 1.3e-3))
    notes = report.result_findings(_result(sizes=sizes), topo)
    assert [n.level for n in notes] == ["ok"]
    assert "correct at 1 MiB, 256 MiB" in notes[0].message
    assert "bus bandwidth 361 GB/s at 256 MiB = 80% of the nominal 450 GB/s" in notes[0].message
    table = report.render_table(_result(sizes=sizes), topo)
    assert "busbw" in table and "361.4 GB/s" in table and "80%" in table


@pytest.mark.unit
def test_notes_low_bandwidth_over_nvlink_warns():
    topo = topology.read_topology({}, nvml=FakeNvml(8))
    sizes = (run.SizeResult(256 << 20, 16, 20e-3),)  # busbw 23 GB/s: not NVLink
    notes = report.result_findings(_result(sizes=sizes), topo)
    assert notes[0].level == "warn" and "NCCL_DEBUG=INFO" in notes[0].fix


@pytest.mark.unit
def test_notes_timeout_names_causes_and_variables():
    r = _result("timeout", message="did not finish within 120 s (stuck: ...)", log_dir="/tmp/x")
    (note,) = report.result_findings(r)
    assert note.level == "error" and "/tmp/x" in note.message
    for word in (
        "P2P",
        "ACS",
        "NVLink",
        "NCCL_DEBUG=INFO",
        "NCCL_P2P_DISABLE=1",
        "NCCL_P2P_LEVEL",
        "NCCL_IB_DISABLE=1",
        "NCCL_SOCKET_IFNAME",
        "NCCL_SHM_DISABLE",
    ):
        assert word in note.fix


@pytest.mark.unit
def test_notes_wrong_sums_are_an_error():
    sizes = (run.SizeResult(256 << 20, 16, 1.3e-3, bad_ranks=(2, 3)),)
    (note,) = report.result_findings(
        _result("wrong", sizes=sizes, message="wrong sums on rank(s) 2-3 at 256 MiB")
    )
    assert note.level == "error" and "2-3" in note.message


@pytest.mark.unit
def test_findings_skip_without_gpus(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, monkeypatch)
    monkeypatch.setattr(gpus, "load_nvml", lambda: FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    (f,) = report.findings(cfg)
    assert f.level == "warn" and f.message.startswith("interconnect check skipped: no NVIDIA driver")


@pytest.mark.unit
def test_findings_skip_without_torch(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, monkeypatch, VLLM_PYTHON=_no_torch_python(tmp_path))
    monkeypatch.setattr(gpus, "load_nvml", lambda: FakeNvml(8))
    (f,) = report.findings(cfg)
    assert f.level == "warn" and "skipped: torch is not installed" in f.message


@pytest.mark.unit
def test_findings_skip_for_cpu_device(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, monkeypatch, DEVICE="cpu", TENSOR_PARALLEL_SIZE="1")
    (f,) = report.findings(cfg)
    assert f.level == "warn" and "skipped" in f.message


@pytest.mark.unit
def test_findings_runs_the_check_on_tp_gpus(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, monkeypatch, TENSOR_PARALLEL_SIZE="4")
    monkeypatch.setattr(gpus, "load_nvml", lambda: FakeNvml(8))
    monkeypatch.setattr(report, "torch_missing", lambda python: None)
    seen = {}

    def fake_run(n, **kw):
        seen.update(kw, n=n)
        return _result(world=n, sizes=(run.SizeResult(256 << 20, 16, 1.3e-3),))

    monkeypatch.setattr(report, "run_check", fake_run)
    found = report.findings(cfg)
    assert seen["n"] == 4 and seen["backend"] == "nccl"
    assert seen["env"]["NCCL_NVLS_ENABLE"] == "0"
    assert seen["log_dir"] == cfg.log_dir / "interconnect"
    assert [f.level for f in found] == ["ok", "ok"]
    assert all(f.check == "Interconnect" for f in found)


@pytest.mark.unit
def test_cli_skips_in_one_line_without_gpus(monkeypatch, capsys):
    monkeypatch.setattr(gpus, "load_nvml", lambda: FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    assert command.main(["--world-size", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("interconnect check skipped:")


@pytest.mark.unit
def test_cli_rejects_more_ranks_than_gpus(monkeypatch, capsys):
    monkeypatch.setattr(gpus, "load_nvml", lambda: FakeNvml(2))
    assert command.main(["--world-size", "4"]) == 2
    assert "--world-size 4 but 2 GPU(s)" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Real worker processes


@pytest.mark.integration
def test_failing_rank_ends_the_others_quickly(tmp_path):
    # A stand-in python: rank 0 fails at once, rank 1 would wait for it for a minute.
    script = tmp_path / "fakepython"
    # Rank 1 also leaves a child behind, which must die with its process group.
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$RANK" = 0 ]; then sleep 0.5; echo "RuntimeError: boom" >&2; exit 1; fi\n'
        f"sleep 60 & echo $! > {tmp_path}/child.pid\n"
        "exec sleep 60\n"
    )
    script.chmod(0o755)
    t0 = time.monotonic()
    env = run.worker_env(os.environ, {}, "gloo")
    r = run.run_check(2, backend="gloo", timeout=30, python=str(script), env=env, log_dir=tmp_path / "logs")
    assert time.monotonic() - t0 < 8
    assert r.status == "failed" and "rank 0 failed: RuntimeError: boom" in r.message
    assert r.log_dir == str(tmp_path / "logs") and (tmp_path / "logs" / "rank0.log").exists()
    assert not any(_alive(p) for p in r.pids)
    # The KILL to its group has been sent; on a loaded machine the kernel may take a moment to end it.
    child = int((tmp_path / "child.pid").read_text())
    assert wait_until(lambda: not _alive(child), 30), f"pid {child} of rank 1's group outlived the check"


@pytest.mark.integration
@needs("torch")
def test_gloo_all_reduce_is_checked_and_timed():
    r = run.run_check(2, backend="gloo", sizes=(64 << 10, 1 << 20), iters=3, timeout=60)
    assert r.status == "ok", r.message
    assert [s.nbytes for s in r.sizes] == [64 << 10, 1 << 20]
    assert all(s.bad_ranks == () and s.time_s > 0 and s.algbw > 0 for s in r.sizes)
    assert r.torch_version and r.log_dir is None  # its temporary logs are gone
    assert _leftovers(r.run_id) == []
    data = json.loads(json.dumps(r.as_dict()))
    assert data["sizes"][1]["busbw_gbps"] == pytest.approx(data["sizes"][1]["algbw_gbps"])  # 2(n-1)/n = 1


@pytest.mark.integration
@needs("torch")
def test_hung_peer_becomes_a_timeout_error_and_no_worker_is_left(tmp_path):
    # Long enough for both ranks to import torch on a loaded 2-core machine (8 s was not).
    timeout = 20.0
    t0 = time.monotonic()
    r = run.run_check(
        2, backend="gloo", sizes=(1 << 20,), timeout=timeout, simulate_hang_rank=1, log_dir=tmp_path / "logs"
    )
    took = time.monotonic() - t0
    assert r.status == "timeout"
    assert timeout <= took < timeout + 6
    assert r.stuck[1] == "a simulated hang (--simulate-hang-rank)"
    assert r.stuck[0] == "the warm-up all-reduce"
    assert _leftovers(r.run_id) == []
    assert not any(_alive(p) for p in r.pids)
    (note,) = report.result_findings(r)
    assert note.level == "error" and "did not finish within 20 s" in note.message
    assert "rank 1 in a simulated hang" in note.message and "NCCL_P2P_DISABLE=1" in note.fix


@pytest.mark.integration
@needs("torch")
def test_cli_gloo_prints_the_table():
    cmd = [sys.executable, "-m", "qwen3_vl_service.interconnect", "--backend", "gloo", "--world-size", "2"]
    out = subprocess.run([*cmd, "--sizes", "64K,1M"], capture_output=True, text=True, cwd=ROOT, timeout=90)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Interconnect check: gloo, 2 rank(s)")
    header = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["size", "iters"])
    assert lines[header + 1].split()[:2] == ["64", "KiB"]
    assert lines[header + 2].split()[:2] == ["1", "MiB"] and lines[header + 2].endswith("ok")
    assert any(ln.startswith("ok") and "correct at 64 KiB, 1 MiB" in ln for ln in lines)


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_parent(tmp_path):
    # The parent is SIGKILLed (no clean-up runs): the kernel must still end its ranks.
    cmd = [sys.executable, "-m", "qwen3_vl_service.interconnect", "--backend", "gloo", "--world-size", "2"]
    cmd += ["--timeout", "60", "--simulate-hang-rank", "1", "--log-dir", str(tmp_path)]
    parent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:
            for rank in (0, 1):
                for e in run._events(tmp_path / f"rank{rank}.log"):
                    if e.get("event") == "start":
                        pids[rank] = e["pid"]
            time.sleep(0.05)
        assert len(pids) == 2, "the workers did not start"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids.values() if _alive(p)]
    for p in left:  # do not leave them behind even when the assertion fails
        os.kill(p, 9)
    assert left == []


@pytest.mark.integration
@needs("torch")
def test_nccl_without_cuda_is_skipped_not_failed():
    r = run.run_check(1, backend="nccl", sizes=(1 << 20,), timeout=60)
    if r.status != "skipped":
        pytest.skip(f"this torch can run NCCL here ({r.status})")
    assert "sees no CUDA GPU" in r.message or "without NCCL" in r.message
    (note,) = report.result_findings(r)
    assert note.level == "warn" and note.message.startswith("interconnect check skipped:")
