"""A model directory, as far as the launcher needs to know it: facts, files, problems.

``inspect(path)`` reads config.json (top level, ``text_config`` and
``vision_config``), the quantization settings, the safetensors index and the
header of every shard, and checks that the tokenizer, the processor configs
and the chat template are there. It never raises for a bad directory: what is
wrong becomes ``ModelInfo.issues`` (Findings of the check "Model"), which the
preflight prints.

Each shard's size is checked exactly: a safetensors file is an 8-byte header
length, a JSON header and the tensor data, and the header's largest data
offset says how long the file must be. A download cut short leaves a shorter
file, which fails here in milliseconds rather than in vLLM after minutes of
loading. When download.py left a manifest, its sizes (and its own ``verify``)
are used as well.

Before the download, ``for_plan`` plans from the published checkpoint's
facts that the package carries (published_models.json: config.json, the
index's total_size, with their source; see its "about"), and says so; once the
folder is there, downloaded by download_model.py, its facts are checked
against them.

Nothing here imports torch, transformers or vLLM.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_vl_service.core.errors import CheckFailed
from qwen3_vl_service.core.findings import Finding, Level
from qwen3_vl_service.download.manifest import read_manifest
from qwen3_vl_service.download.verify import INDEX_FILE, SINGLE_FILE, read_header, verify

# The architectures this launcher was written and checked for.
KNOWN_ARCHITECTURES = frozenset({"Qwen3VLMoeForConditionalGeneration", "Qwen3VLForConditionalGeneration"})
# Prefixes of the vision tower's tensors (transformers >= 4.57 writes "model.visual.").
VISION_PREFIXES = ("model.visual.", "visual.")
_FIX_DOWNLOAD = "run download_model.py again (it resumes and re-checks)"
PUBLISHED_FILE = "published_models.json"  # package data: the published checkpoints' facts
# The carried total_size is derived from config.json's shapes (published_models.json, "about"):
# a real index within this share of it agrees.
PUBLISHED_SIZE_TOLERANCE = 0.01


@dataclass(frozen=True)
class Shard:
    name: str
    size: int | None  # bytes on disk; None when the file is missing
    expected: int | None = None  # bytes it must have (manifest, else its own header); None unknown
    problem: str = ""  # "" when the file looks complete


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    exists: bool = False
    config_error: str = ""
    architectures: tuple[str, ...] = ()
    model_type: str = ""
    # Text model (config.json "text_config", or the top level for text-only models).
    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    rope_scaling_factor: float = 1.0
    # Multimodal RoPE of the text model (rope_scaling / rope_parameters), kept in a YaRN override.
    mrope_section: tuple[int, ...] | None = None
    mrope_interleaved: bool = False
    dtype: str = ""  # the checkpoint's dtype for unquantized parts ("bfloat16")
    vision: Mapping[str, Any] = field(default_factory=dict)
    # quantization_config
    quant_method: str = ""
    weight_block_size: tuple[int, ...] | None = None
    quant_fmt: str = ""
    # Files
    index_file: str = ""  # INDEX_FILE or SINGLE_FILE
    index_total_size: int | None = None  # metadata.total_size: the tensor bytes
    shards: tuple[Shard, ...] = ()
    vision_bytes: int | None = None  # exact, from the shard headers
    tokenizer_files: tuple[str, ...] = ()
    processor_files: tuple[str, ...] = ()
    chat_template: str = ""  # where the chat template lives, "" when there is none
    tokenizer_max_length: int | None = None
    manifest: bool = False
    manifest_repo: str = ""  # the repo download_model.py fetched into the folder ("" unknown)
    # Where the facts come from when not from the folder: "" (the folder), else the published
    # checkpoint's facts carried in the package (for_plan), named for the report.
    planned_from: str = ""
    issues: tuple[Finding, ...] = ()

    # -- derived facts ------------------------------------------------------

    @property
    def config_ok(self) -> bool:
        known = self.exists or bool(self.planned_from)
        return known and not self.config_error and self.num_hidden_layers is not None

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def missing_shards(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.shards if s.size is None)

    @property
    def bad_shards(self) -> tuple[Shard, ...]:
        return tuple(s for s in self.shards if s.size is not None and s.problem)

    @property
    def shard_bytes(self) -> int:
        """Bytes of the shard files present on disk."""
        return sum(s.size or 0 for s in self.shards)

    @property
    def weights_bytes(self) -> int | None:
        """The checkpoint's tensor bytes: the index's metadata.total_size, else what the shards add up to."""
        if self.index_total_size:
            return self.index_total_size
        known = [s.expected or s.size for s in self.shards]
        if known and all(known):
            return sum(k or 0 for k in known)
        return None

    @property
    def max_model_len_limit(self) -> int | None:
        """The longest MAX_MODEL_LEN vLLM accepts (vllm/config/model.py, _get_and_verify_max_len)."""
        if self.max_position_embeddings is None:
            return None
        limit = float(self.max_position_embeddings)
        if self.tokenizer_max_length:
            limit = min(limit, float(self.tokenizer_max_length))
        return int(limit * self.rope_scaling_factor)

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(i for i in self.issues if i.level == "error")


# ---------------------------------------------------------------------------


def _read_json(path: Path) -> tuple[Any, str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh), ""
    except FileNotFoundError:
        return None, "missing"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON (line {exc.lineno}: {exc.msg})"
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"


def _pos_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _rope_factor(text: Mapping[str, Any]) -> float:
    """The factor vLLM multiplies max_position_embeddings by (not for yarn/longrope/llama3 types)."""
    rope = text.get("rope_scaling") or text.get("rope_parameters")
    if not isinstance(rope, Mapping):
        return 1.0
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind in ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"):
        return 1.0
    factor = rope.get("factor")
    return float(factor) if isinstance(factor, (int, float)) and factor > 0 else 1.0


def _manifest(path: Path) -> tuple[bool, dict[str, int], list[str], str, str]:
    """(present, sizes, verify() problems, note, repo) from the download manifest, offline."""
    try:
        manifest = read_manifest(path)
    except CheckFailed as exc:  # a broken manifest is a finding, not a crash
        return True, {}, [], f"the download manifest cannot be used: {exc.one_line()}", ""
    if manifest is None:
        return False, {}, [], "", ""
    sizes = {f.name: f.size for f in manifest.files}
    return True, sizes, verify(path, deep=False, manifest=manifest), "", manifest.repo


def vllm_architectures() -> frozenset[str] | None:
    """The architectures in the vLLM installed for this interpreter, read from its registry's text.

    Reading the file, not importing vLLM: importing it takes seconds. None
    when vLLM is not installed here (it may live in VLLM_PYTHON's venv).
    """
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        registry = Path(base) / "model_executor" / "models" / "registry.py"
        try:
            text = registry.read_text(encoding="utf-8")
        except OSError:
            continue
        return frozenset(re.findall(r'^\s*"([A-Za-z0-9_]+)":\s*\(', text, flags=re.MULTILINE))
    return None


def _list(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def inspect(path: str | Path) -> ModelInfo:
    """Everything the preflight needs to know about the model directory at PATH."""
    p = Path(path)
    issues: list[Finding] = []
    facts: dict[str, Any] = {"path": p}

    if not p.exists():
        issues.append(
            Finding(
                "error",
                "Model",
                f"Model not found at {p}",
                "run download_model.py, or set MODEL_PATH to the model's folder",
            )
        )
        return ModelInfo(**facts, issues=tuple(issues))
    if not p.is_dir():
        issues.append(
            Finding(
                "error",
                "Model",
                f"MODEL_PATH {p} is a file, not a folder",
                "set MODEL_PATH to the model's folder",
            )
        )
        return ModelInfo(**facts, issues=tuple(issues))
    facts["exists"] = True

    # -- config.json --------------------------------------------------------
    config, err = _read_json(p / "config.json")
    if err:
        facts["config_error"] = f"config.json {err}"
        issues.append(Finding("error", "Model", f"config.json in {p} is {err}", _FIX_DOWNLOAD))
    elif not isinstance(config, dict):
        facts["config_error"] = "config.json is not a JSON object"
        issues.append(Finding("error", "Model", f"config.json in {p} is not a JSON object", _FIX_DOWNLOAD))
        config = None
    if config is not None:
        _config_facts(config, facts, issues)

    # -- tokenizer, processor, chat template ------------------------------
    tok_cfg, _ = _read_json(p / "tokenizer_config.json")
    _tokenizer_facts(p, tok_cfg if isinstance(tok_cfg, dict) else {}, facts, issues)

    # -- weights ------------------------------------------------------------
    present, sizes, manifest_problems, manifest_note, facts["manifest_repo"] = _manifest(p)
    facts["manifest"] = present
    if manifest_note:
        issues.append(Finding("warn", "Model", manifest_note, _FIX_DOWNLOAD))
    # verify()'s lines carry their own fix ("...; rerun download_model.py").
    for problem in manifest_problems[:8]:
        issues.append(Finding("error", "Model", f"download manifest check: {problem}"))
    if len(manifest_problems) > 8:
        issues.append(
            Finding(
                "error",
                "Model",
                f"download manifest check: {len(manifest_problems) - 8} more problems",
                _FIX_DOWNLOAD,
            )
        )
    _weights_facts(p, sizes, facts, issues, already=manifest_problems)

    partial = sorted(p.glob(".cache/huggingface/download/**/*.incomplete"))
    if partial:
        issues.append(
            Finding(
                "warn",
                "Model",
                f"{len(partial)} unfinished download file(s) under {p / '.cache/huggingface/download'}",
                "let download_model.py finish (or run it again)",
            )
        )
    return ModelInfo(**facts, issues=tuple(issues))


def _config_facts(config: dict[str, Any], facts: dict[str, Any], issues: list[Finding]) -> None:
    archs = config.get("architectures")
    facts["architectures"] = tuple(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ()
    facts["model_type"] = str(config.get("model_type", ""))
    text = config.get("text_config")
    text = text if isinstance(text, dict) else config
    vision = config.get("vision_config")
    facts["vision"] = dict(vision) if isinstance(vision, dict) else {}

    for key in (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    ):
        facts[key] = _pos_int(text.get(key))
    facts["num_key_value_heads"] = _pos_int(text.get("num_key_value_heads")) or facts["num_attention_heads"]
    head_dim = _pos_int(text.get("head_dim"))
    if head_dim is None and facts["hidden_size"] and facts["num_attention_heads"]:
        head_dim = facts["hidden_size"] // facts["num_attention_heads"]
    facts["head_dim"] = head_dim
    facts["rope_scaling_factor"] = _rope_factor(text)
    rope = text.get("rope_scaling") or text.get("rope_parameters")
    if isinstance(rope, Mapping):
        section = rope.get("mrope_section")
        if isinstance(section, list) and section and all(_pos_int(x) for x in section):
            facts["mrope_section"] = tuple(section)
        facts["mrope_interleaved"] = rope.get("mrope_interleaved") is True
    dtype = text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
    facts["dtype"] = str(dtype or "")

    missing = [
        k
        for k in ("num_hidden_layers", "num_attention_heads", "head_dim", "max_position_embeddings")
        if not facts[k]
    ]
    if missing:
        issues.append(
            Finding(
                "error",
                "Model",
                f"config.json lacks {', '.join(missing)} (in text_config or at the top level)",
                _FIX_DOWNLOAD,
            )
        )
        facts["num_hidden_layers"] = None  # config_ok is False: no maths on a partial config

    quant = config.get("quantization_config") or text.get("quantization_config")
    if isinstance(quant, dict):
        facts["quant_method"] = str(quant.get("quant_method", ""))
        facts["quant_fmt"] = str(quant.get("fmt", ""))
        block = quant.get("weight_block_size")
        if isinstance(block, list) and block and all(_pos_int(b) for b in block):
            facts["weight_block_size"] = tuple(block)
    _architecture_issues(facts["architectures"], issues)


def _architecture_issues(archs: tuple[str, ...], issues: list[Finding]) -> None:
    """No architecture, one the installed vLLM does not serve, or one this launcher was not built for."""
    if not archs:
        issues.append(
            Finding("error", "Model", 'config.json names no architecture ("architectures")', _FIX_DOWNLOAD)
        )
    elif not any(a in KNOWN_ARCHITECTURES for a in archs):
        served = vllm_architectures()
        if served is not None and not any(a in served for a in archs):
            issues.append(
                Finding(
                    "error",
                    "Model",
                    f"architecture {archs[0]} is not one the installed vLLM serves",
                    "point MODEL_PATH at Qwen/Qwen3-VL-235B-A22B-Thinking-FP8 (or a model vLLM supports)",
                )
            )
        else:
            where = (
                "the installed vLLM lists it" if served is not None else "vLLM is not installed here to ask"
            )
            issues.append(
                Finding(
                    "warn",
                    "Model",
                    f"architecture {archs[0]} is not the Qwen3-VL this launcher is built for ({where})",
                    "the capacity numbers assume a Qwen3-VL layout; check them",
                )
            )


def _tokenizer_facts(p: Path, tok_cfg: dict[str, Any], facts: dict[str, Any], issues: list[Finding]) -> None:
    names = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
    found = tuple(n for n in names if (p / n).is_file())
    facts["tokenizer_files"] = found
    fast = "tokenizer.json" in found
    slow = "vocab.json" in found and "merges.txt" in found
    missing = []
    if "tokenizer_config.json" not in found:
        missing.append("tokenizer_config.json")
    if not (fast or slow):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        issues.append(
            Finding("error", "Model", f"tokenizer files missing in {p}: {', '.join(missing)}", _FIX_DOWNLOAD)
        )
    mml = tok_cfg.get("model_max_length")
    # Tokenizers without a limit write a huge sentinel (1e30); vLLM's min() makes it harmless.
    facts["tokenizer_max_length"] = mml if isinstance(mml, int) and 0 < mml < 10**12 else None

    proc = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")
    found_proc = tuple(n for n in proc if (p / n).is_file())
    facts["processor_files"] = found_proc
    if "preprocessor_config.json" not in found_proc:
        issues.append(
            Finding(
                "error",
                "Model",
                f"preprocessor_config.json missing in {p}: images cannot be processed",
                _FIX_DOWNLOAD,
            )
        )
    elif "video_preprocessor_config.json" not in found_proc:
        issues.append(
            Finding(
                "warn",
                "Model",
                f"video_preprocessor_config.json missing in {p}: videos use the image processor's settings",
                _FIX_DOWNLOAD,
            )
        )

    if (p / "chat_template.jinja").is_file():
        facts["chat_template"] = "chat_template.jinja"
    elif (p / "chat_template.json").is_file():
        facts["chat_template"] = "chat_template.json"
    elif isinstance(tok_cfg.get("chat_template"), (str, list)):
        facts["chat_template"] = "tokenizer_config.json"
    else:
        issues.append(
            Finding(
                "error",
                "Model",
                f"no chat template in {p} (chat_template.jinja, chat_template.json or "
                "tokenizer_config.json): every /v1/chat/completions request would fail",
                _FIX_DOWNLOAD,
            )
        )


def _weights_facts(
    p: Path, manifest_sizes: dict[str, int], facts: dict[str, Any], issues: list[Finding], already: list[str]
) -> None:
    """Index and shards; a shard the manifest check already named is not reported twice."""
    names = _shard_names(p, facts, issues)
    if names is None:
        return
    shards, vision_bytes, headers_ok = _read_shards(p, names, manifest_sizes)
    facts["shards"] = tuple(shards)
    facts["vision_bytes"] = vision_bytes if headers_ok and vision_bytes else None
    _shard_issues(p, shards, facts.get("index_total_size"), headers_ok, issues, already)


def _shard_names(p: Path, facts: dict[str, Any], issues: list[Finding]) -> list[str] | None:
    """The shard files the index names (or the single model.safetensors); None, with the issue, if none."""
    index, err = _read_json(p / INDEX_FILE)
    if err == "missing":
        if (p / SINGLE_FILE).is_file():
            facts["index_file"] = SINGLE_FILE
            return [SINGLE_FILE]
        issues.append(
            Finding("error", "Model", f"no {INDEX_FILE} (and no {SINGLE_FILE}) in {p}", _FIX_DOWNLOAD)
        )
        return None
    if err or not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        why = err or "has no weight_map"
        issues.append(Finding("error", "Model", f"{INDEX_FILE} in {p} {why}", _FIX_DOWNLOAD))
        return None
    facts["index_file"] = INDEX_FILE
    meta = index.get("metadata")
    facts["index_total_size"] = _pos_int(meta.get("total_size")) if isinstance(meta, dict) else None
    names = sorted({v for v in index["weight_map"].values() if isinstance(v, str)})
    if not names:
        issues.append(Finding("error", "Model", f"{INDEX_FILE} in {p} lists no shard files", _FIX_DOWNLOAD))
        return None
    return names


def _read_shards(p: Path, names: list[str], manifest_sizes: dict[str, int]) -> tuple[list[Shard], int, bool]:
    """(each shard's size and problem, the vision tower's bytes, whether every header was read)."""
    shards: list[Shard] = []
    vision_bytes = 0
    headers_ok = True
    for name in names:
        f = p / name
        try:
            size = f.stat().st_size
        except OSError:
            shards.append(Shard(name, None, manifest_sizes.get(name), "missing"))
            headers_ok = False
            continue
        expected, vision, problem = read_header(f, size, VISION_PREFIXES)
        if problem:
            headers_ok = False
        else:
            vision_bytes += vision
        want = manifest_sizes.get(name, expected)
        if not problem and want is not None and size != want:
            source = "the download manifest" if name in manifest_sizes else "its safetensors header"
            problem = (
                f"truncated: {size:,} of {want:,} bytes ({source})"
                if size < want
                else f"{size:,} bytes, {source} says {want:,}"
            )
        shards.append(Shard(name, size, want, problem))
    return shards, vision_bytes, headers_ok


def _shard_issues(
    p: Path,
    shards: list[Shard],
    total: int | None,
    headers_ok: bool,
    issues: list[Finding],
    already: list[str],
) -> None:
    """Missing and damaged shards (those verify() did not name already), and a short total."""

    def reported(name: str) -> bool:
        return any(problem.startswith(f"{name}:") for problem in already)

    missing = [s.name for s in shards if s.size is None and not reported(s.name)]
    if missing:
        issues.append(
            Finding(
                "error",
                "Model",
                f"{len(missing)} of {len(shards)} weight shards missing in {p}: {_list(missing)}",
                _FIX_DOWNLOAD,
            )
        )
    bad = [s for s in shards if s.size is not None and s.problem and not reported(s.name)]
    for s in bad[:5]:
        issues.append(Finding("error", "Model", f"weight shard {s.name} is {s.problem}", _FIX_DOWNLOAD))
    if len(bad) > 5:
        issues.append(
            Finding("error", "Model", f"{len(bad) - 5} more weight shards are damaged", _FIX_DOWNLOAD)
        )
    if total and not already and not any(s.problem for s in shards) and headers_ok:
        data = sum((s.size or 0) for s in shards)
        if data < total:
            issues.append(
                Finding(
                    "error",
                    "Model",
                    f"the shards hold {data:,} bytes, less than the {total:,} the index's total_size names",
                    _FIX_DOWNLOAD,
                )
            )


# ---------------------------------------------------------------------------
# The published checkpoint's facts (package data), for a plan before the download.


@dataclass(frozen=True)
class Published:
    """One checkpoint's entry of published_models.json (see its "about" for what is derived)."""

    repo: str
    source: str
    revision: str
    config: Mapping[str, Any]
    tokenizer_max_length: int | None
    total_size: int

    @property
    def label(self) -> str:
        return (
            f"the published facts of {self.repo} ({self.revision}) carried in the package: its config.json, "
            f"total_size {self.total_size / 1024**3:.2f} GiB derived from the config's shapes"
        )


@functools.cache
def _published_table() -> dict[str, Published]:
    text = importlib.resources.files(__package__).joinpath(PUBLISHED_FILE).read_text(encoding="utf-8")
    table = {}
    for repo, entry in json.loads(text)["checkpoints"].items():
        table[repo] = Published(
            repo=repo,
            source=entry["source"],
            revision=entry["revision"],
            config=entry["config.json"],
            tokenizer_max_length=entry["tokenizer_config.json"].get("model_max_length"),
            total_size=entry["model.safetensors.index.json"]["metadata"]["total_size"],
        )
    return table


def published(repo: str) -> Published | None:
    """The carried facts of REPO (a Hub repo id), or None when the package carries none for it."""
    return _published_table().get(repo)


def from_published(path: str | Path, pub: Published) -> ModelInfo:
    """What inspect() would say of a complete download of PUB at PATH, without its files.

    The vision tower's bytes are left to the plan's estimate from vision_config (there are no
    shard headers to read); the weights are the derived total_size.
    """
    facts: dict[str, Any] = {"path": Path(path)}
    issues: list[Finding] = []
    _config_facts(dict(pub.config), facts, issues)
    facts.update(
        index_file=INDEX_FILE,
        index_total_size=pub.total_size,
        tokenizer_max_length=pub.tokenizer_max_length,
        planned_from=pub.label,
    )
    return ModelInfo(**facts, issues=tuple(issues))


def for_plan(info: ModelInfo, repo: str, *, dry_run: bool) -> ModelInfo:
    """INFO as the plan should see it, given MODEL_REPO=REPO ("": no published facts wanted).

    Not downloaded yet (no folder, or no config.json in it): the published
    facts of REPO, with one Model line that says so, a warning in a dry run
    (plan before you queue) and an error for a start. A folder that
    download_model.py fetched from REPO: its own facts, checked against the
    published ones (a difference is a warning: the carried facts are stale).
    """
    pub = published(repo) if repo else None
    if pub is None:
        return info
    if info.exists and info.config_error != "config.json missing":
        return _checked(_sized(info, pub), pub)
    where = "no such folder" if not info.exists else "no config.json in it yet"
    level: Level = "warn" if dry_run else "error"
    note = Finding(
        level,
        "Model",
        f"{info.path}: not downloaded yet ({where}); the plan uses {pub.label}",
        "run download_model.py before starting (about "
        f"{pub.total_size / 1e9:.0f} GB, resumable), or set MODEL_PATH to the model's folder",
    )
    planned = from_published(info.path, pub)
    return dataclasses.replace(planned, exists=info.exists, issues=(note, *planned.issues))


# What a downloaded folder must share with the carried facts (ModelInfo fields).
_PUBLISHED_FIELDS = (
    "architectures",
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "quant_method",
    "quant_fmt",
    "weight_block_size",
)


def published_differences(info: ModelInfo, pub: Published) -> list[str]:
    """How the folder's facts differ from the carried ones ("name folder, carried"); [] when they agree."""
    carried = from_published(info.path, pub)
    diffs = [
        f"{key} {getattr(info, key)!r} here, {getattr(carried, key)!r} carried"
        for key in _PUBLISHED_FIELDS
        if getattr(info, key) != getattr(carried, key)
    ]
    total = info.index_total_size
    if total and abs(total - pub.total_size) > PUBLISHED_SIZE_TOLERANCE * pub.total_size:
        diffs.append(f"total_size {total:,} here, {pub.total_size:,} derived")
    return diffs


def _sized(info: ModelInfo, pub: Published) -> ModelInfo:
    """A download under way (config.json there, no index yet): its size from the published facts.

    Only when the folder's config.json is the published one; the missing index stays an error.
    """
    if not info.config_ok or info.weights_bytes is not None or published_differences(info, pub):
        return info
    note = Finding(
        "warn",
        "Model",
        f"{INDEX_FILE} is not in {info.path} yet: the capacity is planned with the published "
        f"total_size of {pub.repo} ({pub.total_size:,} bytes, derived from its config.json)",
        _FIX_DOWNLOAD,
    )
    return dataclasses.replace(
        info, index_total_size=pub.total_size, planned_from=pub.label, issues=(*info.issues, note)
    )


def _checked(info: ModelInfo, pub: Published) -> ModelInfo:
    """A folder download_model.py fetched from PUB's repo, checked against the carried facts."""
    if info.manifest_repo != pub.repo or not info.config_ok:
        return info
    diffs = published_differences(info, pub)
    if diffs:
        finding = Finding(
            "warn",
            "Model",
            f"{info.path} (download_model.py fetched {pub.repo}) differs from the facts this package "
            f"carries for it: {_list(diffs, 4)}; the plan uses the folder's",
            f"nothing to change for this start; the carried facts "
            f"(qwen3_vl_service/planning/{PUBLISHED_FILE}) are stale: report it",
        )
    else:
        finding = Finding(
            "ok",
            "Model",
            f"config.json and total_size agree with the published facts of {pub.repo} carried in the package",
        )
    return dataclasses.replace(info, issues=(*info.issues, finding))


__all__ = [
    "INDEX_FILE",
    "KNOWN_ARCHITECTURES",
    "PUBLISHED_FILE",
    "ModelInfo",
    "Published",
    "Shard",
    "for_plan",
    "from_published",
    "inspect",
    "published",
    "published_differences",
    "vllm_architectures",
]
