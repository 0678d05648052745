"""Secrets out of every display: which names hold one, and how a value is shown instead.

One rule for every report, log header, status and dry run: a setting, an
environment variable or a command-line flag whose name says key, token,
secret or password (API_KEY, HF_TOKEN, HUGGING_FACE_HUB_TOKEN, WANDB_API_KEY,
AWS_SECRET_ACCESS_KEY, --hf-token, ...) has its value shown as MASKED: not
one character of it, nor its length. MAX_TOKENS, TOKENIZERS_PARALLELISM and
the like name a count or a switch (a word that only starts with "token"), and
are shown as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

MASKED = "(set, masked)"
NOT_SET = "(not set)"
# A part of a name (split at anything not a letter or digit) that ends with one of these says secret:
# KEY, APIKEY, TOKEN, AUTHTOKEN, ...; SECRET, PASSWORD, CREDENTIAL anywhere in a part (SECRETS, CREDENTIALS).
_ENDINGS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD")
_ANYWHERE = ("SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


def is_secret(name: str) -> bool:
    """Whether NAME (a setting, a variable, a flag like --hf-token) says that its value is a secret."""
    for part in re.split(r"[^A-Za-z0-9]+", name.upper()):
        if part.endswith(_ENDINGS) or any(w in part for w in _ANYWHERE):
            return True
    return False


def mask(value: str) -> str:
    """How a secret value is shown: that it is set, nothing of it."""
    return MASKED if value else NOT_SET


def shown(name: str, value: str) -> str:
    """VALUE as a display shows NAME's value: masked when NAME says secret."""
    return mask(value) if is_secret(name) else value


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    """ENV with the values of its secret-named variables masked."""
    return {k: shown(k, v) for k, v in env.items()}


def mask_argv(argv: Iterable[str]) -> list[str]:
    """ARGV with the value of every secret-named flag masked (--hf-token X, --api-key=X)."""
    out: list[str] = []
    hide_next = False
    for word in argv:
        if hide_next and not word.startswith("--"):
            out.append(MASKED)
            hide_next = False
            continue
        hide_next = False
        if word.startswith("--"):
            flag, eq, value = word.partition("=")
            if is_secret(flag):
                if eq:
                    out.append(f"{flag}={mask(value)}")
                    continue
                hide_next = True
        out.append(word)
    return out


def scrub(text: str, values: Iterable[str]) -> str:
    """TEXT with every occurrence of the secret VALUES replaced: for text that quotes a value as it is
    (an error message, a line of another program's output)."""
    for value in sorted({v for v in values if len(v) >= 4}, key=len, reverse=True):
        text = text.replace(value, MASKED)
    return text


__all__ = ["MASKED", "NOT_SET", "is_secret", "mask", "mask_argv", "mask_env", "scrub", "shown"]
