"""PROFILE: named sets of settings, applied under the user's own.

The original README's four tuning recipes, plus the default. A profile fills
in only the settings that neither the config file nor the environment set: a
key the user sets always wins, and ``--dry-run`` shows where each value came
from (``profile long-context``, ``file config.env``, ``environment``).

Every profile leaves ``MAX_NUM_SEQS=auto``: vLLM's own default for the GPU
(1024 on an H100 or H200), never the full-length sequences that fit, which the
plan shows as information (plan.py says why: issue 22 measured 0.46 x bare
vLLM at 128 concurrent requests with that cap). The vLLM knobs the profiles set
were measured with bench/bench_side_by_side.py against bare vLLM with the
recipe's flags, all resident on one H100 (vLLM 0.26.0, the real-shape
block-FP8 checkpoint cut to 3 layers, 512 tokens in / 128 out, one 512x512
image per request in the image rows); the numbers are in docs/benchmarks.md,
"Side by side", and the comments below cite them.

=============  ==============================================================
balanced       32K context, vLLM's own batch sizes, STREAM_INTERVAL=8 (a
               streamed chunk per 8 tokens: the first token still at once)
throughput     balanced, plus GPU_MEMORY_UTIL 0.95, a 16K context (more of
               the cache per request) and MAX_NUM_BATCHED_TOKENS=16384 (twice
               vLLM's default per step on an H100 or H200)
long-context   a 64K context
low-latency    balanced's engine (no vLLM knob measured faster at one request),
               TEMPERATURE 0.3 and answers capped at 512 tokens (MAX_TOKENS):
               short, focused replies return sooner. The cap counts the
               Thinking model's reasoning too, so a question it reasons long
               about ends cut off with no answer (the preflight warns): the
               original README's recipe, for short tasks
creative       TEMPERATURE 1.0, TOP_P 0.95, TOP_K 50: more varied text
=============  ==============================================================
"""

from __future__ import annotations

DEFAULT_PROFILE = "balanced"

# Every key a profile may set; balanced sets them all, the others change some.
BALANCED = {
    "MAX_MODEL_LEN": "32768",
    "MAX_NUM_SEQS": "auto",
    "MAX_NUM_BATCHED_TOKENS": "auto",
    "PERFORMANCE_MODE": "balanced",
    # Streaming every token costs the API server a delta (and a reasoning-parser pass) per token:
    # bare vLLM streams each token without a parser, and at 64 concurrent image requests the
    # service with STREAM_INTERVAL=1 ran at 0.92 and 0.895 x bare in two runs (1.02 x without the
    # parser), with 8 at 1.24 x (docs/benchmarks.md, "Side by side", runs 2 and 3).
    "STREAM_INTERVAL": "8",
    "GPU_MEMORY_UTIL": "0.90",
    "TEMPERATURE": "0.7",
    "TOP_P": "0.95",
    "TOP_K": "20",
    "MAX_TOKENS": "8192",
}
PROFILES: dict[str, dict[str, str]] = {
    "balanced": {},
    # Measured as PERFORMANCE_MODE=throughput with STREAM_INTERVAL=8: 1.07-1.29 x bare at 64-256
    # concurrent text requests, 1.19-1.31 x with images (runs 1 and 2). In vLLM 0.26.0 that mode
    # only doubles the default sequences (2048) and batched tokens (16384); no run came near 1024
    # sequences, so the batched tokens made the difference. The profile sets those alone: 2048
    # sequences would leave each 458 KV tokens on 8 x H100 (the plan warns of preemption).
    "throughput": {
        "GPU_MEMORY_UTIL": "0.95",
        "MAX_MODEL_LEN": "16384",
        "MAX_NUM_BATCHED_TOKENS": "16384",
    },
    "long-context": {"MAX_MODEL_LEN": "65536"},
    # Balanced's engine: its time per output token at 1 request was 0.93-0.96 x bare's for text and
    # 0.84-0.95 x with an image (runs 1 and 3; STREAM_INTERVAL=1 gave 1.02 x with an image in run 2
    # and 0.80 x at 128 image requests). PERFORMANCE_MODE=interactivity was tried here and left out:
    # 0.99 x at 1 request, 0.80-0.82 x at 64 and 256 (run 1).
    "low-latency": {"TEMPERATURE": "0.3", "MAX_TOKENS": "512"},
    "creative": {"TEMPERATURE": "1.0", "TOP_P": "0.95", "TOP_K": "50"},
}
PROFILE_KEYS = frozenset(BALANCED)


def parse(raw: str) -> str:
    """PROFILE's parser: a profile name, or ValueError with the list."""
    value = raw.strip().lower() or DEFAULT_PROFILE
    if value not in PROFILES:
        raise ValueError(f"allowed: {', '.join(PROFILES)}")
    return value


def settings(name: str) -> dict[str, str]:
    """The settings profile NAME gives (balanced's, changed by the profile's own)."""
    return {**BALANCED, **PROFILES[name]}


def apply(name: str, raw: dict[str, str], sources: dict[str, str]) -> None:
    """Fill RAW (and SOURCES) with profile NAME's values for the keys the user left unset."""
    for key, value in settings(name).items():
        if key not in raw:
            raw[key], sources[key] = value, f"profile {name}"


__all__ = ["DEFAULT_PROFILE", "PROFILES", "PROFILE_KEYS", "apply", "parse", "settings"]
