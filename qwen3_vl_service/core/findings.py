"""Finding: one line of a check's verdict (ok / warn / error, with its fix), the one type every check returns.

The preflight (GPUs, SLURM, ports), the plan, the model inspection and the
interconnect check all report through it; ``preflight.render`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Level = Literal["ok", "warn", "error"]


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str  # the report's column: "GPUs", "SLURM", "Model", "Parallel", ...
    message: str  # what is wrong (or right), with the values involved
    fix: str = ""  # what to do about it; shown for warn and error


__all__ = ["Finding", "Level"]
