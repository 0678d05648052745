"""Child processes that run our modules: this package on their path, and an end with their parent.

Standard library only: the interconnect worker imports it under VLLM_PYTHON.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Mapping
from pathlib import Path

# The folder that holds this package: first on a child's PYTHONPATH.
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_PR_SET_PDEATHSIG = 1


def with_package_path(env: Mapping[str, str]) -> dict[str, str]:
    """ENV with this package importable first, for ``-m qwen3_vl_service.X`` under any Python."""
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, out.get("PYTHONPATH", "")) if p)
    return out


def die_with_parent(sig: int, parent: int | None = None, exit_code: int = 0) -> None:
    """Have Linux send SIG to this process when its parent dies, even by SIGKILL (PR_SET_PDEATHSIG).

    A parent that died before the call (the parent is no longer PARENT, or,
    without PARENT, init adopted us) means exit at once with EXIT_CODE.
    Elsewhere than Linux only that check is made.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent if parent is not None else os.getppid() == 1:
        os._exit(exit_code)
