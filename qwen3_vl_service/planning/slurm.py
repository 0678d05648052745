"""The SLURM allocation this process runs in, read from the SLURM_* variables.

``allocation()`` only reads variables: values that cannot be parsed are kept
out of the numbers and named in ``Allocation.notes``. Not every SLURM exports
the job's end time (SLURM_JOB_END_TIME; 22.05, Debian 12's, does not):
``squeue_end_time()`` then asks ``squeue`` once, with a short timeout, since
the controller may be slow to answer; ``with_end_time()`` puts it in.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

MiB = 1024**2
# How long squeue may take to tell the job's end time before it is left unknown.
SQUEUE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Allocation:
    job_id: str
    # SLURM_GPUS_ON_NODE, or the length of SLURM_JOB_GPUS; None when the job has no GPUs recorded.
    gpus_on_node: int | None = None
    # SLURM_JOB_GPUS (or SLURM_STEP_GPUS): the GPU indices of the job on this node.
    job_gpus: tuple[str, ...] = ()
    # SLURM_MEM_PER_NODE (MB), or SLURM_MEM_PER_CPU x SLURM_CPUS_ON_NODE; None: no --mem limit given.
    mem_per_node_bytes: int | None = None
    # SLURM_JOB_END_TIME (Unix seconds), or squeue's answer (with_end_time); None: unknown or no limit.
    end_time: float | None = None
    time_left_s: float | None = None
    end_time_source: str = ""  # "SLURM_JOB_END_TIME" or "squeue"; empty while end_time is None
    node_name: str = ""  # SLURMD_NODENAME: set where slurmd started us; empty in a bare salloc shell
    nodelist: str = ""
    partition: str = ""
    cpus_on_node: int | None = None
    notes: tuple[str, ...] = ()


def _int(env: Mapping[str, str], key: str, notes: list[str]) -> int | None:
    raw = env.get(key, "").strip()
    if not raw:
        return None
    # SLURM_GPUS_ON_NODE / SLURM_CPUS_ON_NODE are plain numbers; tolerate "8(x2)".
    m = re.match(r"^(\d+)", raw)
    if not m:
        notes.append(f"{key}={raw!r} is not a number; ignored")
        return None
    return int(m.group(1))


_MEM_UNITS = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def _mem_mb(env: Mapping[str, str], key: str, notes: list[str]) -> float | None:
    raw = env.get(key, "").strip()
    if not raw:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", raw.upper())
    if not m:
        notes.append(f"{key}={raw!r} is not a memory size; ignored")
        return None
    return float(m.group(1)) * _MEM_UNITS[m.group(2)]


def _gpu_list(raw: str) -> tuple[str, ...]:
    """'0,1,2,3' or '0-3' or '0-1,4' -> ('0', '1', ...); other forms kept as written."""
    out: list[str] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m and int(m.group(1)) <= int(m.group(2)):
            out.extend(str(i) for i in range(int(m.group(1)), int(m.group(2)) + 1))
        else:
            out.append(part)
    return tuple(out)


def allocation(environ: Mapping[str, str] | None = None, now: float | None = None) -> Allocation | None:
    """The allocation (job) this process belongs to, or None outside SLURM."""
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID", "").strip() or env.get("SLURM_JOBID", "").strip()
    if not job_id:
        return None
    notes: list[str] = []
    job_gpus = _gpu_list(env.get("SLURM_JOB_GPUS", "") or env.get("SLURM_STEP_GPUS", ""))
    gpus = _int(env, "SLURM_GPUS_ON_NODE", notes)
    if gpus is None and job_gpus:
        gpus = len(job_gpus)
    cpus = _int(env, "SLURM_CPUS_ON_NODE", notes)

    mem_mb = _mem_mb(env, "SLURM_MEM_PER_NODE", notes)
    if mem_mb is None:
        per_cpu = _mem_mb(env, "SLURM_MEM_PER_CPU", notes)
        if per_cpu is not None and cpus:
            mem_mb = per_cpu * cpus
    # 0 means "all the node's memory" (--mem=0): no limit to check against.
    mem_bytes = int(mem_mb * MiB) if mem_mb else None

    end_time: float | None = None
    raw_end = env.get("SLURM_JOB_END_TIME", "").strip()
    if raw_end:
        try:
            end_time = float(raw_end)
        except ValueError:
            notes.append(f"SLURM_JOB_END_TIME={raw_end!r} is not a Unix time; ignored")
    # 0 (or a date before the start) is what some setups export for "no limit".
    if end_time is not None and end_time <= 0:
        end_time = None
    current = time.time() if now is None else now
    time_left = None if end_time is None else end_time - current

    return Allocation(
        job_id=job_id,
        gpus_on_node=gpus,
        job_gpus=job_gpus,
        mem_per_node_bytes=mem_bytes,
        end_time=end_time,
        time_left_s=time_left,
        end_time_source="SLURM_JOB_END_TIME" if end_time is not None else "",
        node_name=env.get("SLURMD_NODENAME", "").strip(),
        nodelist=env.get("SLURM_JOB_NODELIST", "").strip() or env.get("SLURM_NODELIST", "").strip(),
        partition=env.get("SLURM_JOB_PARTITION", "").strip(),
        cpus_on_node=cpus,
        notes=tuple(notes),
    )


def squeue_end_time(job_id: str, timeout: float = SQUEUE_TIMEOUT_S) -> tuple[float | None, str]:
    """The end time of JOB_ID from squeue (Unix seconds), or None and why.

    ``squeue -h -j JOB_ID -o "%A %e"`` with SLURM_TIME_FORMAT=%s: Unix seconds,
    whatever the user's own SLURM_TIME_FORMAT or time zone. The line is picked
    by its job id (%A): for the first task of a job array, -j JOB_ID lists
    every task. "Unknown"/"N/A" (no limit, or not known yet) give None.
    """
    exe = shutil.which("squeue")
    if exe is None:
        return None, "squeue is not on PATH"
    try:
        done = subprocess.run(
            [exe, "-h", "-j", job_id, "-o", "%A %e"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "SLURM_TIME_FORMAT": "%s"},
        )
    except subprocess.TimeoutExpired:
        return None, f"squeue did not answer within {timeout:g} s"
    except OSError as exc:
        return None, f"squeue could not run: {exc.strerror or exc}"
    rows = [line.split() for line in done.stdout.splitlines()]
    ends = [row[1] for row in rows if len(row) == 2 and row[0] == job_id]
    if done.returncode != 0 or not ends:
        err = done.stderr.strip().splitlines()
        return None, f"squeue does not list job {job_id}" + (f" ({err[-1]})" if err else "")
    if not ends[0].isdigit():
        return None, f"squeue gives no end time ({ends[0]})"
    return float(ends[0]), ""


def with_end_time(alloc: Allocation, end_time: float, now: float | None = None) -> Allocation:
    """ALLOC with the end time squeue gave."""
    current = time.time() if now is None else now
    return dataclasses.replace(
        alloc, end_time=end_time, time_left_s=end_time - current, end_time_source="squeue"
    )


__all__ = ["Allocation", "allocation", "squeue_end_time", "with_end_time"]
