"""Record the server flags (and their choices) of a vLLM source tree, for tests/test_vllm_versions.py.

    PYTHONPATH=/tmp/vllm-0.26.0 .venv/bin/python scripts/record_vllm_flags.py OUT.json

Run with a vLLM importable (for the GPU wheel: unzip its *.py files into a folder
and put that first on PYTHONPATH; the CPU venv's torch and transformers serve).
On a machine without a GPU the wheel cannot detect its platform, so the CPU
platform stands in: only the parser is built, nothing runs. The tests then
check every flag the service emits against this record, without vLLM 0.26.
"""

from __future__ import annotations

import json
import sys

import vllm
import vllm.platforms as platforms
from vllm.platforms.cpu import CpuPlatform

platforms._current_platform = CpuPlatform()  # parser only: no device is used
# ruff: noqa: E402 - the platform must be set before the parser modules are imported

try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:  # vLLM before the launchers package
    from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser


def main(out: str) -> int:
    parser = make_arg_parser(FlexibleArgumentParser())
    flags = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                flags[option] = sorted(map(str, action.choices)) if action.choices is not None else None
    record = {
        "_source": f"vllm at {vllm.__file__}: make_arg_parser(FlexibleArgumentParser())",
        "flags": flags,
    }
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1, sort_keys=True)
    print(f"{len(flags)} flags -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
