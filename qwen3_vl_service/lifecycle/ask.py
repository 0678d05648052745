"""ask: send one chat request (text, images, videos) to the running service and print the answer.

    .venv/bin/python -m qwen3_vl_service.lifecycle.ask "What is in this picture?" --image cat.jpg
    .venv/bin/python -m qwen3_vl_service.lifecycle.ask "Describe it" --video clips/run.mp4 --max-tokens 256

A media argument may be an http(s) URL, a file:// URL, or a path: a path under
MEDIA_ROOT becomes a URL on our media server (or file:// with --via-file), so
vLLM reads it from this node; any other path is refused, since vLLM only reads
what MEDIA_ROOT and the media server offer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from urllib.parse import quote

import requests

from qwen3_vl_service.core import cli
from qwen3_vl_service.core.errors import CheckFailed, UsageError
from qwen3_vl_service.core.hosts import local_url
from qwen3_vl_service.settings.config import ServiceConfig, load


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="ask", description="Send one chat request to the running Qwen3-VL service.")
    p.add_argument("prompt", help="the question")
    p.add_argument("--image", action="append", default=[], metavar="PATH|URL")
    p.add_argument("--video", action="append", default=[], metavar="PATH|URL")
    p.add_config()
    p.add_argument(
        "--via-file",
        action="store_true",
        help="send local files as file:// URLs instead of through the media server",
    )
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    p.add_argument("--json", action="store_true", help="print the whole response as JSON")
    return p


def media_url(cfg: ServiceConfig, ref: str, *, via_file: bool = False) -> str:
    """The URL vLLM should fetch for REF (a URL, or a path under MEDIA_ROOT)."""
    if ref.startswith(("http://", "https://", "file://", "data:")):
        return ref
    path = Path(ref).expanduser()
    if not path.is_absolute():
        # Relative paths are relative to MEDIA_ROOT first, then to the working directory.
        path = cfg.media_root / path if (cfg.media_root / path).exists() else path.resolve()
    path = path.resolve()
    try:
        rel = path.relative_to(cfg.media_root)
    except ValueError:
        raise UsageError(
            f"{ref} is not under MEDIA_ROOT={cfg.media_root}",
            fix="copy or link it into MEDIA_ROOT, or pass an http(s) URL",
        ) from None
    if not path.is_file():
        raise UsageError(f"{path} does not exist", fix="check the path")
    if via_file or not cfg.media_server:
        return path.as_uri()
    return f"{local_url(cfg.media_host, cfg.media_port)}/{quote(rel.as_posix())}"


def build_request(cfg: ServiceConfig, args) -> dict:
    content: list[dict] = [
        {"type": "image_url", "image_url": {"url": media_url(cfg, r, via_file=args.via_file)}}
        for r in args.image
    ]
    content += [
        {"type": "video_url", "video_url": {"url": media_url(cfg, r, via_file=args.via_file)}}
        for r in args.video
    ]
    content.append({"type": "text", "text": args.prompt})
    body: dict = {"model": cfg.served_model_name, "messages": [{"role": "user", "content": content}]}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    return body


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    cfg = load(args.config)
    url = f"{local_url(cfg.host, cfg.port)}/v1/chat/completions"
    body = build_request(cfg, args)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    t0 = time.monotonic()
    try:
        resp = requests.post(url, json=body, headers=headers, timeout=args.timeout)
    except requests.ConnectionError:
        raise CheckFailed(
            f"nothing answers at {url}", fix="start the service: .venv/bin/python start_service.py --detach"
        ) from None
    except requests.Timeout:
        raise CheckFailed(f"no answer from {url} within {args.timeout:g} s", fix="raise --timeout") from None
    elapsed = time.monotonic() - t0
    if resp.status_code != 200:
        try:
            detail = resp.json().get("error", {}).get("message") or resp.text
        except ValueError:
            detail = resp.text
        raise CheckFailed(f"the service answered {resp.status_code}: {detail.strip()[:300]}")
    data = resp.json()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    msg = data["choices"][0]["message"]
    reasoning = msg.get("reasoning") or msg.get("reasoning_content")
    if reasoning:
        print(f"[reasoning]\n{reasoning.strip()}\n")
    answer = (msg.get("content") or "").strip()
    if not answer and data["choices"][0].get("finish_reason") == "length":
        answer = "(none yet: the model was still thinking when max_tokens ran out; raise --max-tokens)"
    print(f"[answer]\n{answer}\n")
    usage = data.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens", "?"), usage.get("completion_tokens", "?")
    print(f"({prompt} prompt + {completion} completion tokens, {elapsed:.2f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
