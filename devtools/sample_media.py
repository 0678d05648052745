"""Small sample media for the demo and the end-to-end tests.

    python -m devtools.sample_media DIR

``write_samples(dir)`` writes ``sample.png`` (a synthetic scene), ``sample.jpg``
(the same scene) and ``sample.mp4`` (2 s, 8 fps, a square moving across, MPEG-4
Part 2 via OpenCV's ``mp4v``, which vLLM's default OpenCV video loader reads).
Deterministic. numpy, Pillow and OpenCV come with vLLM; they are imported
inside the functions because the launcher path never needs them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

WIDTH, HEIGHT = 320, 240
VIDEO_FPS = 8
VIDEO_SECONDS = 2


def _scene(shift: int = 0):
    """An RGB uint8 frame: sky gradient, grass, a sun, and a red square at x=shift."""
    import numpy as np

    img = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    rows = np.linspace(0, 1, HEIGHT // 2, dtype=np.float32)[:, None]
    img[: HEIGHT // 2, :, 0] = (90 + 60 * rows).astype(np.uint8)
    img[: HEIGHT // 2, :, 1] = (160 + 60 * rows).astype(np.uint8)
    img[: HEIGHT // 2, :, 2] = 235
    img[HEIGHT // 2 :, :] = (60, 150, 60)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    sun = (yy - 40) ** 2 + (xx - WIDTH + 50) ** 2 < 22**2
    img[sun] = (250, 220, 40)
    x0 = 20 + shift % (WIDTH - 80)
    img[HEIGHT // 2 + 20 : HEIGHT // 2 + 70, x0 : x0 + 50] = (210, 40, 40)
    return img


def write_samples(directory: Path | str) -> list[Path]:
    """Write sample.png, sample.jpg and sample.mp4 into directory; return their paths."""
    import cv2
    from PIL import Image

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    frame = _scene()
    png, jpg, mp4 = out / "sample.png", out / "sample.jpg", out / "sample.mp4"
    Image.fromarray(frame).save(png, format="PNG")
    Image.fromarray(frame).save(jpg, format="JPEG", quality=90)

    tmp = mp4.with_name(mp4.stem + ".tmp.mp4")  # cv2 picks the container from the suffix
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise RuntimeError("OpenCV could not open an mp4v VideoWriter")
    try:
        for i in range(VIDEO_FPS * VIDEO_SECONDS):
            writer.write(cv2.cvtColor(_scene(shift=i * 12), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    if not tmp.is_file() or tmp.stat().st_size == 0:
        raise RuntimeError(f"OpenCV wrote no video to {tmp}")
    tmp.replace(mp4)
    return [png, jpg, mp4]


def main(argv: Sequence[str] | None = None) -> int:
    from qwen3_vl_service.core.cli import ArgumentParser, run

    parser = ArgumentParser(prog="python -m devtools.sample_media", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)

    def body() -> int:
        args = parser.parse_args(argv)  # inside the handler: a bad argument is one line, exit 2
        for p in write_samples(args.out_dir):
            print(f"{p} ({p.stat().st_size} bytes)")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
