"""gpus: --gpus specs, and detect() through NVML with a fake pynvml injected at the edge.

The fake raises pynvml's own exception classes, built from the real error
codes, so detect() is tested against the exceptions real NVML throws.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pynvml
import pytest

from qwen3_vl_service.core.errors import CheckFailed, UsageError
from qwen3_vl_service.machine import gpus

pytestmark = pytest.mark.unit

MiB = 1024**2
H100_TOTAL = 81559 * MiB


class FakeNvml:
    """The slice of pynvml that detect() uses, over a described machine."""

    NVMLError = pynvml.NVMLError
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_NoPermission = pynvml.NVMLError_NoPermission
    NVMLError_LibRmVersionMismatch = pynvml.NVMLError_LibRmVersionMismatch

    def __init__(self, devices=None, *, init_error=None, driver="550.54.15", cuda=12040):
        self.devices = devices if devices is not None else [h100(i) for i in range(8)]
        self.init_error = init_error
        self.driver = driver
        self.cuda = cuda
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < len(self.devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return ("handle", i)

    def _dev(self, handle):
        return self.devices[handle[1]]

    def nvmlDeviceGetName(self, handle):
        return self._dev(handle)["name"]

    def nvmlDeviceGetUUID(self, handle):
        return self._dev(handle)["uuid"]

    def nvmlDeviceGetMemoryInfo(self, handle):
        d = self._dev(handle)
        return SimpleNamespace(total=d["total"], free=d["free"], used=d["total"] - d["free"])

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return self._dev(handle)["cc"]

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self._dev(handle)["procs"]]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlSystemGetProcessName(self, pid):
        return "/usr/bin/somebody"


def h100(i, *, free=None, procs=()):
    return {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": f"GPU-{i:08x}-aaaa-bbbb-cccc-{i:012x}",
        "total": H100_TOTAL,
        "free": H100_TOTAL - 500 * MiB if free is None else free,
        "cc": (9, 0),
        "procs": list(procs),
    }


# -- specs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "count", "total_mib"),
    [
        ("8xH100-80GB", 8, 81559),
        ("4xH100-80GB", 4, 81559),
        ("8xH200-141GB", 8, 143771),
        ("H100-80GB", 1, 81559),
    ],
)
def test_spec_describes_gpus_as_nvml_would(spec, count, total_mib):
    inv = gpus.parse_spec(spec)
    assert inv.count == count
    assert {g.total_bytes for g in inv.gpus} == {total_mib * MiB}
    assert all(g.free_bytes == g.total_bytes for g in inv.gpus)
    assert inv.source == f"spec {spec}"


@pytest.mark.parametrize(
    ("spec", "name", "total_mib"),
    [("8xH200", "H200-141GB", 143771), ("8xh100", "H100-80GB", 81559), ("2xB200", "B200-180GB", 183359)],
)
def test_a_known_model_without_its_memory_gets_its_usual_size(spec, name, total_mib):
    """Issue 24, item 5: `--gpus 8xH200` plans as 8xH200-141GB (the memory as NVML reports it)."""
    inv = gpus.parse_spec(spec)
    assert {(g.name, g.total_bytes) for g in inv.gpus} == {(name, total_mib * MiB)}
    assert inv.count == int(spec.split("x")[0])


def test_a_model_sold_in_several_sizes_needs_its_memory_written():
    with pytest.raises(UsageError) as err:
        gpus.parse_spec("8xA100")
    assert err.value.one_line() == (
        "GPU spec '8xA100' has no memory, and A100 comes in several sizes; "
        "write it: 8xA100-40GB or 8xA100-80GB"
    )


@pytest.mark.parametrize("spec", ["eight H100", "8xFOO", "0xH100-80GB", "8xH100-0GB"])
def test_bad_spec_is_a_usage_error_with_an_example(spec):
    with pytest.raises(UsageError) as err:
        gpus.parse_spec(spec)
    assert (
        "8xH100-80GB" in err.value.one_line()
        or "between 1 and 64" in err.value.one_line()
        or "memory" in str(err.value)
    )


# -- detect() --------------------------------------------------------------------


def test_detect_reads_every_gpu_and_the_driver():
    fake = FakeNvml()
    inv = gpus.detect(environ={}, nvml=fake)
    assert inv.source == "nvml"
    assert inv.count == 8
    assert [g.index for g in inv.gpus] == list(range(8))
    g = inv.gpus[0]
    assert g.name == "NVIDIA H100 80GB HBM3"
    assert g.total_bytes == H100_TOTAL and g.free_bytes == H100_TOTAL - 500 * MiB
    assert g.compute_capability == (9, 0)
    assert g.uuid.startswith("GPU-00000000")
    assert inv.driver_version == "550.54.15"
    assert inv.cuda_version == "12.4"
    assert inv.visible_devices is None
    assert (fake.inits, fake.shutdowns) == (1, 1)


def test_detect_honours_cuda_visible_devices_indices_in_cuda_order():
    inv = gpus.detect(environ={"CUDA_VISIBLE_DEVICES": "6,7,4,5"}, nvml=FakeNvml())
    assert [g.index for g in inv.gpus] == [6, 7, 4, 5]
    assert inv.visible_devices == "6,7,4,5"
    assert inv.notes == ()


def test_detect_honours_cuda_visible_devices_uuids_and_prefixes():
    fake = FakeNvml()
    full3 = fake.devices[3]["uuid"]
    prefix1 = fake.devices[1]["uuid"][:12]  # CUDA accepts a unique prefix
    inv = gpus.detect(environ={"CUDA_VISIBLE_DEVICES": f"{full3},{prefix1}"}, nvml=fake)
    assert [g.index for g in inv.gpus] == [3, 1]


@pytest.mark.parametrize("value", ["", "-1"])
def test_detect_with_no_visible_gpu(value):
    inv = gpus.detect(environ={"CUDA_VISIBLE_DEVICES": value}, nvml=FakeNvml())
    assert inv.count == 0


def test_detect_stops_where_cuda_stops_and_says_so():
    inv = gpus.detect(environ={"CUDA_VISIBLE_DEVICES": "0,1,9,2"}, nvml=FakeNvml())
    assert [g.index for g in inv.gpus] == [0, 1]
    assert len(inv.notes) == 1 and "'9'" in inv.notes[0] and "CUDA ignores" in inv.notes[0]


def test_cuda_order_is_the_one_rule_for_indices_uuids_and_where_cuda_stops():
    uuids = ["GPU-aa11", "GPU-ab22", "GPU-ac33", "GPU-ba44"]
    asked: list[int] = []

    def uuid_of(i: int) -> str:
        asked.append(i)
        return uuids[i]

    assert gpus.cuda_order(["2", "0"], 4, uuid_of) == ([2, 0], None)
    assert asked == []  # no UUID entry: NVML is not asked for UUIDs
    assert gpus.cuda_order(["gpu-BA", "GPU-ab22"], 4, uuid_of) == ([3, 1], None)  # prefixes, any case
    assert gpus.cuda_order(["1", "GPU-a", "0"], 4, uuid_of) == ([1], 1)  # ambiguous prefix: CUDA stops
    assert gpus.cuda_order(["1", "4", "0"], 4, uuid_of) == ([1], 1)  # no GPU 4
    assert gpus.cuda_order(["1", "GPU-ab", "0"], 4, uuid_of) == ([1], 1)  # GPU 1 twice
    with pytest.raises(CheckFailed, match="MIG instance"):
        gpus.cuda_order(["MIG-1234"], 4, uuid_of)


def test_detect_refuses_mig_instances():
    with pytest.raises(CheckFailed, match="MIG"):
        gpus.detect(environ={"CUDA_VISIBLE_DEVICES": "MIG-1234"}, nvml=FakeNvml())


def test_detect_lists_other_processes_with_their_memory():
    me = os.getpid()
    devices = [
        h100(0),
        h100(1, free=H100_TOTAL - 20_000 * MiB, procs=[(me, 19_500 * MiB), (999_999_999, None)]),
    ]
    inv = gpus.detect(environ={}, nvml=FakeNvml(devices))
    procs = inv.gpus[1].processes
    assert [p.pid for p in procs] == [me, 999_999_999]
    assert procs[0].used_bytes == 19_500 * MiB
    assert procs[0].name  # psutil's name for this very process
    assert procs[1].name == "somebody" and procs[1].used_bytes == 0  # not visible to psutil: NVML's name
    assert inv.gpus[0].processes == ()


def test_no_driver_is_one_clear_line_not_an_nvml_exception():
    fake = FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with pytest.raises(CheckFailed) as err:
        gpus.detect(environ={}, nvml=fake)
    assert "no NVIDIA driver" in err.value.message
    assert "libnvidia-ml.so.1" in err.value.message
    assert "--gpus 8xH100-80GB" in (err.value.fix or "")
    assert "\n" not in err.value.one_line()


def test_driver_not_loaded_is_a_clear_line():
    with pytest.raises(CheckFailed, match="driver is not loaded"):
        gpus.detect(environ={}, nvml=FakeNvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED))


def test_other_nvml_start_failures_name_the_nvml_error():
    with pytest.raises(CheckFailed, match=r"Unknown Error|NVML could not start"):
        gpus.detect(environ={}, nvml=FakeNvml(init_error=pynvml.NVML_ERROR_UNKNOWN))


def test_missing_pynvml_package_is_a_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(CheckFailed, match="nvidia-ml-py"):
        gpus.detect(environ={})


def test_the_real_nvml_on_this_machine():
    """Real pynvml: on a node without a driver, the same clear line; with GPUs, an inventory."""
    try:
        inv = gpus.detect(environ={})
    except CheckFailed as exc:
        assert "no NVIDIA driver" in exc.message or "NVML" in exc.message
        assert "\n" not in exc.one_line()
    else:
        assert inv.source == "nvml"
        assert all(g.total_bytes > 0 for g in inv.gpus)


def test_gpus_behind_a_device_cgroup_are_left_out_with_a_note():
    class Fenced(FakeNvml):
        def nvmlDeviceGetHandleByIndex(self, i):
            if i >= 4:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
            return super().nvmlDeviceGetHandleByIndex(i)

    inv = gpus.detect(environ={}, nvml=Fenced())
    assert [g.index for g in inv.gpus] == [0, 1, 2, 3]
    assert inv.notes == ("no permission to open GPU(s) 4,5,6,7 (another job's?); left out",)
