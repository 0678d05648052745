"""How long `start_service.py --dry-run` takes, against a bare `python -c pass`, in one run.

    .venv/bin/python bench/bench_dryrun.py [--runs 20]

The dry run does all the preflight a user waits for on a login node: config,
GPU plan from a spec (8xH100-80GB), SLURM, the model directory (a stand-in of
the real checkpoint's layout: config.json, index, 48 sparse shards of the real
total size), ports, and the vLLM probe (a `python -c` in the vLLM interpreter,
the one part that costs a second process). The peer, `python -c pass`, is the
floor of any Python command. Runs alternate between the two so that machine
noise hits both alike; the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    import realmodel  # the tests' stand-in of the real checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = realmodel.build(Path(tmp) / "model")
        env_file = realmodel.write_config_env(Path(tmp) / "config.env", model)
        dry = [sys.executable, str(REPO / "start_service.py"), "--config", str(env_file), "--dry-run"]
        dry += ["--gpus", "8xH100-80GB"]
        bare = [sys.executable, "-c", "pass"]
        out = subprocess.run(dry, capture_output=True, text=True, check=False)
        print(f"dry run exit code {out.returncode}; its verdict: {out.stdout.strip().splitlines()[-1]}")
        times: dict[str, list[float]] = {"dry-run": [], "python -c pass": []}
        for _ in range(args.runs):
            for name, argv in (("dry-run", dry), ("python -c pass", bare)):
                t0 = time.perf_counter()
                subprocess.run(argv, capture_output=True, check=False)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, values in times.items():
        ms = med[name] * 1000
        print(f"{name:>16}: median {ms:7.1f} ms   min {min(values) * 1000:7.1f} ms   ({len(values)} runs)")
    ratio = med["dry-run"] / med["python -c pass"]
    print(
        f"ratio dry-run / python -c pass: {ratio:.1f}x  (target: the dry run answers in well under a second)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
