"""PROFILE: named sets of settings, applied under the user's own.

The original README's four tuning recipes, plus the default. A profile fills
in only the settings that neither the config file nor the environment set: a
key the user sets always wins, and ``--dry-run`` shows where each value came
from (``profile long-context``, ``file config.env``, ``environment``).

Sizes are not fixed numbers: every profile leaves ``MAX_NUM_SEQS=auto``, and
the capacity plan turns that into the number of full-length sequences
(MAX_MODEL_LEN tokens each) that the KV cache of these GPUs holds, so a
profile that shortens the context gets more sequences, one that lengthens it
fewer, and a larger GPU more (plan.py, ``resolve_max_num_seqs``).

=============  ==============================================================
balanced       the defaults: 32K context, as many full-length sequences as fit
throughput     GPU_MEMORY_UTIL 0.95 and a 16K context: about twice the
               sequences at once (requests that fit in 16K)
long-context   a 64K context: about half the sequences of balanced
low-latency    TEMPERATURE 0.3 and answers capped at 512 tokens (MAX_TOKENS):
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
    "GPU_MEMORY_UTIL": "0.90",
    "TEMPERATURE": "0.7",
    "TOP_P": "0.95",
    "TOP_K": "20",
    "MAX_TOKENS": "8192",
}
PROFILES: dict[str, dict[str, str]] = {
    "balanced": {},
    "throughput": {"GPU_MEMORY_UTIL": "0.95", "MAX_MODEL_LEN": "16384"},
    "long-context": {"MAX_MODEL_LEN": "65536"},
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
