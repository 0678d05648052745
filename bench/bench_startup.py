"""Time to a healthy server: `start_service.py --detach` against a bare vLLM with the same arguments.

    .venv/bin/python bench/bench_startup.py [--rounds 2]

Both serve the tiny Qwen3-VL-MoE (generated here) on vLLM's CPU build with the
demo settings (config.demo.env), on free ports. Ours: the wall time of
`start_service.py --config config.demo.env --detach`, which returns once
/health answers 200 (config, preflight, media server, run state, vLLM, the
readiness watch). Peer: `python -m vllm.entrypoints.openai.api_server` with
the argv and environment that the launcher would use (vllm_args.build), timed
from spawn to the first 200 on /health, polled every 0.2 s. Rounds alternate
(peer, ours, peer, ours, ...) so that machine noise hits both; each server is
stopped (stop_service.py / SIGTERM to the pid) before the next. Prints the
medians and the ratio ours / bare (target: at most 1.05).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen3_vl_service.machine.processes import server_port  # noqa: E402


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bare vLLM exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit("bare vLLM did not become healthy in time")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from devtools import sample_media, tiny_model
    from qwen3_vl_service.planning import vllm_args
    from qwen3_vl_service.settings import config

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        root = Path(tmp)
        tiny_model.generate(root / "model")
        sample_media.write_samples(root / "media")
        port, media_port = server_port(), server_port()
        overrides = {
            "PORT": str(port),
            "MEDIA_PORT": str(media_port),
            "MODEL_PATH": str(root / "model"),
            "MEDIA_ROOT": str(root / "media"),
            "RUN_DIR": str(root / "run"),
            "LOG_DIR": str(root / "logs"),
        }
        env = {**os.environ, **overrides}
        cfg = config.load(REPO / "config.demo.env", environ=env)
        # vLLM's IPC sockets in this run's folder, as the launcher has them (else they
        # pile up in /tmp: vLLM leaves them behind at shutdown).
        (root / "ipc").mkdir()
        from qwen3_vl_service.planning import model as model_mod
        from qwen3_vl_service.planning import plan as plan_mod

        # The plan fills in MAX_NUM_SEQS=auto exactly as the launcher's does.
        plan = plan_mod.make(cfg, None, model_mod.inspect(cfg.model_path))
        cmd = vllm_args.build(cfg, expert_parallel=False, plan=plan)
        from qwen3_vl_service.lifecycle import runstate

        tmp_env = runstate.temp_env(str(root / "ipc"), os.environ)
        bare_env = vllm_args.with_inherited({**cmd.env, **tmp_env}, os.environ)
        demo = ["--config", str(REPO / "config.demo.env")]
        times: dict[str, list[float]] = {"bare vLLM": [], "start_service.py --detach": []}
        spawn: list[float] = []
        for r in range(args.rounds):
            with open(root / f"bare-{r}.log", "wb") as log:
                t0 = time.monotonic()
                proc = subprocess.Popen(list(cmd.argv), env=bare_env, stdout=log, stderr=subprocess.STDOUT)
                wait_health(f"http://127.0.0.1:{port}/health", proc)
                times["bare vLLM"].append(time.monotonic() - t0)
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
            t0 = time.monotonic()
            launcher = subprocess.Popen(
                [sys.executable, str(REPO / "start_service.py"), *demo, "--detach", "--quiet"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            before, lines = 0.0, []
            for line in launcher.stdout:  # timestamp the line printed right after vLLM's spawn
                lines.append(line)
                if line.startswith("started vLLM in the background"):
                    before = time.monotonic() - t0
            rc = launcher.wait()
            elapsed = time.monotonic() - t0
            subprocess.run(
                [sys.executable, str(REPO / "stop_service.py"), *demo, "--all"], env=env, capture_output=True
            )
            if rc != 0:
                print("".join(lines)[-3000:])
                return 1
            times["start_service.py --detach"].append(elapsed)
            spawn.append(before)
            print(
                f"round {r + 1}: bare {times['bare vLLM'][-1]:.1f} s, ours {elapsed:.1f} s "
                f"(of which {before:.2f} s in the launcher before vLLM was spawned)",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, values in times.items():
        print(f"{name:>26}: median {med[name]:6.1f} s  ({', '.join(f'{v:.1f}' for v in values)})")
    pre = statistics.median(spawn)
    print(f"launcher work before vLLM's spawn (preflight, media server, state): median {pre:.2f} s")
    ratio = med["start_service.py --detach"] / med["bare vLLM"]
    print(f"ratio start_service.py --detach / bare vLLM: {ratio:.3f}  (target: at most 1.05)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
