"""slurm.allocation(): the job as the SLURM_* variables describe it; squeue_end_time() where they don't."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from qwen3_vl_service.planning import slurm

pytestmark = pytest.mark.unit

GiB = 1024**3
NOW = 1_750_000_000.0


def test_outside_slurm_there_is_no_allocation():
    assert slurm.allocation(environ={}, now=NOW) is None
    assert slurm.allocation(environ={"SLURM_JOB_ID": "  "}, now=NOW) is None


def test_a_full_gpu_job():
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7",
        "SLURM_MEM_PER_NODE": "512000",
        "SLURM_JOB_END_TIME": str(int(NOW + 7200)),
        "SLURMD_NODENAME": "gpu017",
        "SLURM_JOB_NODELIST": "gpu017",
        "SLURM_JOB_PARTITION": "h100",
        "SLURM_CPUS_ON_NODE": "64",
    }
    a = slurm.allocation(environ=env, now=NOW)
    assert a is not None
    assert a.job_id == "4242"
    assert a.gpus_on_node == 8
    assert a.job_gpus == tuple(str(i) for i in range(8))
    assert a.mem_per_node_bytes == 512000 * 1024**2
    assert a.end_time == NOW + 7200 and a.time_left_s == 7200
    assert (a.node_name, a.nodelist, a.partition, a.cpus_on_node) == ("gpu017", "gpu017", "h100", 64)
    assert a.notes == ()


def test_gpu_count_falls_back_to_the_job_gpu_list_with_ranges():
    a = slurm.allocation(environ={"SLURM_JOB_ID": "1", "SLURM_JOB_GPUS": "0-3,6"}, now=NOW)
    assert a.gpus_on_node == 5 and a.job_gpus == ("0", "1", "2", "3", "6")


def test_memory_per_cpu_times_cpus():
    env = {"SLURM_JOB_ID": "1", "SLURM_MEM_PER_CPU": "4096", "SLURM_CPUS_ON_NODE": "16"}
    assert slurm.allocation(environ=env, now=NOW).mem_per_node_bytes == 64 * GiB


def test_no_mem_limit_and_no_end_time_are_none():
    a = slurm.allocation(environ={"SLURM_JOB_ID": "1", "SLURM_MEM_PER_NODE": "0"}, now=NOW)
    assert a.mem_per_node_bytes is None and a.time_left_s is None and a.gpus_on_node is None


def test_unparsable_values_become_notes_not_crashes():
    env = {
        "SLURM_JOB_ID": "1",
        "SLURM_GPUS_ON_NODE": "lots",
        "SLURM_MEM_PER_NODE": "big",
        "SLURM_JOB_END_TIME": "soon",
    }
    a = slurm.allocation(environ=env, now=NOW)
    assert a.gpus_on_node is None and a.mem_per_node_bytes is None and a.end_time is None
    assert len(a.notes) == 3 and any("SLURM_GPUS_ON_NODE" in n for n in a.notes)


def test_memory_with_a_unit():
    a = slurm.allocation(environ={"SLURM_JOB_ID": "1", "SLURM_MEM_PER_NODE": "500G"}, now=NOW)
    assert a.mem_per_node_bytes == 500 * GiB


def test_time_left_can_be_negative_when_the_job_is_over():
    a = slurm.allocation(environ={"SLURM_JOB_ID": "1", "SLURM_JOB_END_TIME": str(int(NOW - 10))}, now=NOW)
    assert a.time_left_s == -10


# -- squeue_end_time: where SLURM exports no SLURM_JOB_END_TIME (22.05 does not) ---------
# A stand-in squeue (a real executable on PATH): SLURM itself is the edge here.


def put_squeue(monkeypatch, tmp_path: Path, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "squeue"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bin_dir


def test_squeue_end_time_asks_for_unix_seconds_and_picks_its_own_job(monkeypatch, tmp_path):
    end = int(time.time()) + 5400
    # The first task of an array: squeue -j lists the whole array, pending tasks first.
    put_squeue(
        monkeypatch,
        tmp_path,
        f'echo "$SLURM_TIME_FORMAT $@" > "{tmp_path}/args"; printf "4243 N/A\\n4242 {end}\\n4244 N/A\\n"',
    )
    monkeypatch.setenv("SLURM_TIME_FORMAT", "relative")  # the user's own: overridden
    got, why = slurm.squeue_end_time("4242")
    assert (got, why) == (float(end), "")
    assert (tmp_path / "args").read_text().split() == ["%s", "-h", "-j", "4242", "-o", "%A", "%e"]
    alloc = slurm.with_end_time(slurm.allocation(environ={"SLURM_JOB_ID": "4242"}), got, now=got - 5400)
    assert alloc.time_left_s == 5400 and alloc.end_time_source == "squeue"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("echo 4242 Unknown", "squeue gives no end time (Unknown)"),
        ("echo 4243 1900000000", "squeue does not list job 4242"),
        (
            "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1",
            "squeue does not list job 4242 (slurm_load_jobs error: Invalid job id specified)",
        ),
        ("exit 0", "squeue does not list job 4242"),
        ("exec sleep 30", "squeue did not answer within 0.5 s"),
    ],
)
def test_squeue_end_time_unknown_says_why(monkeypatch, tmp_path, body, why):
    put_squeue(monkeypatch, tmp_path, body)
    started = time.monotonic()
    assert slurm.squeue_end_time("4242", timeout=0.5) == (None, why)
    assert time.monotonic() - started < 10  # a hung controller does not hang the preflight


def test_squeue_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm.squeue_end_time("4242") == (None, "squeue is not on PATH")
