"""Generate a random Qwen3-VL-MoE checkpoint: tiny for the CPU demo, real-shaped block-FP8 for GPUs.

    python -m devtools.tiny_model OUT_DIR [--seed N]
    python -m devtools.tiny_model OUT_DIR --fp8 [--real-shapes --layers N]

--fp8 writes the published FP8 checkpoint's layout (see fp8_checkpoint);
--real-shapes the published widths (hidden 4096, 128 experts, vocabulary
151,936, Qwen's token ids), cut to N text layers, streamed shard by shard
without building a model (random data on the GPU when there is one).

The Hub is out of reach on the CI and demo machines, so the model is made here:
the same architecture (``Qwen3VLMoeForConditionalGeneration``, model_type
``qwen3_vl_moe``) and the same file layout as Qwen/Qwen3-VL-235B-A22B-Thinking-FP8
(config.json with ``text_config`` + ``vision_config`` and the token ids at the
top level, sharded safetensors listed in ``model.safetensors.index.json``,
tokenizer files, chat template, image/video processor configs,
generation_config.json), but with tiny sizes, random bfloat16 weights and no
``quantization_config`` (vLLM's FP8 kernels need GPUs or Intel AMX; the CPU
demo runs the same architecture in bfloat16).

Deterministic: the same seed gives the same bytes in every file. A few seconds.

torch, transformers and tokenizers are imported inside the functions only: the
launcher path never imports this module.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# -- the architecture, in the real checkpoint's config.json layout -------------

# Qwen2/Qwen3 added tokens, in Qwen's order (real ids 151643..151668), with
# their "special" flag as in Qwen's tokenizer.json: <think>, <tool_call>, ...
# are NOT special, so they survive skip_special_tokens and the reasoning
# parser can see "</think>" in the decoded text.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

BPE_VOCAB_TARGET = 4000  # learned entries (256 byte symbols + merges), before the added tokens
TEXT: dict[str, Any] = {
    # Real: hidden 4096, 94 layers, 64/4 heads, head_dim 128, 128 experts top-8,
    # moe_intermediate 1536. moe_intermediate is chosen so that the fused expert
    # tensors are not square: a missing transpose then fails loudly in vLLM.
    "hidden_size": 128,
    "intermediate_size": 384,
    "moe_intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    # Real: mrope_section [24, 20, 20] for head_dim 128 (sums to head_dim / 2).
    "mrope_section": [6, 5, 5],
}
# Small FP8 (--fp8 without --real-shapes): every linear width a multiple of the
# 128 block where vLLM requires it (q and k/v of the fused qkv, gate and up of
# the fused w13), not square, so the scale grid [ceil(out/128), ceil(in/128)]
# differs from its transpose.
TEXT_FP8: dict[str, Any] = {
    **TEXT,
    "hidden_size": 256,
    "intermediate_size": 768,
    "moe_intermediate_size": 384,
    "head_dim": 64,
    "mrope_section": [12, 10, 10],
}
# The published model's text shapes (model-facts.md); the depth comes from --layers.
TEXT_REAL: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 94,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "mrope_section": [24, 20, 20],
}
VISION: dict[str, Any] = {
    # Real: depth 27, hidden 1152, 16 heads, intermediate 4304, deepstack [8, 16, 24].
    "depth": 2,
    "hidden_size": 64,
    "num_heads": 2,
    "intermediate_size": 128,
    "deepstack_visual_indexes": [0, 1],
}
VISION_REAL: dict[str, Any] = {
    "depth": 27,
    "hidden_size": 1152,
    "num_heads": 16,
    "intermediate_size": 4304,
    "deepstack_visual_indexes": [8, 16, 24],
}
REAL_VOCAB = 151936  # the embedding rows; Qwen's added tokens start at 151643
REAL_ADDED_BASE = 151643
MAX_SHARD_BYTES = 1 << 20  # about 3-4 shards, like the real checkpoint's many
REAL_SHARD_BYTES = 4 << 30  # the published shards are about 4-5 GB each


def vision_cut(depth: int) -> dict[str, Any]:
    """VISION_REAL cut to depth blocks (3..27), the deepstack taps scaled into the cut.

    vLLM adds the deepstack features to the first len(indexes) text layers and
    sizes its multiscale input by their count, so the cut keeps all three taps,
    strictly increasing and inside the depth (27 gives the real [8, 16, 24]).
    """
    if not 3 <= depth <= VISION_REAL["depth"]:
        raise ValueError(f"vision depth {depth} outside 3..{VISION_REAL['depth']}")
    real = VISION_REAL["deepstack_visual_indexes"]
    taps = [i * depth // VISION_REAL["depth"] for i in real]
    return {**VISION_REAL, "depth": depth, "deepstack_visual_indexes": taps}


def token_ids(base: int) -> dict[str, int]:
    return {tok: base + i for i, (tok, _special) in enumerate(ADDED_TOKENS)}


def build_config(
    ids: dict[str, int],
    vocab_size: int,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json, field for field like the real checkpoint's (less quantization_config)."""
    t, v = text or TEXT, vision or VISION
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"],
        "dtype": "bfloat16",
        "image_token_id": ids["<|image_pad|>"],
        "model_type": "qwen3_vl_moe",
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "decoder_sparse_step": 1,
            "dtype": "bfloat16",
            "eos_token_id": ids["<|im_end|>"],
            "head_dim": t["head_dim"],
            "hidden_act": "silu",
            "hidden_size": t["hidden_size"],
            "initializer_range": 0.02,
            "intermediate_size": t["intermediate_size"],
            "max_position_embeddings": 262144,
            "mlp_only_layers": [],
            "model_type": "qwen3_vl_moe_text",
            "moe_intermediate_size": t["moe_intermediate_size"],
            "norm_topk_prob": True,
            "num_attention_heads": t["num_attention_heads"],
            "num_experts": t["num_experts"],
            "num_experts_per_tok": t["num_experts_per_tok"],
            "num_hidden_layers": t["num_hidden_layers"],
            "num_key_value_heads": t["num_key_value_heads"],
            "rms_norm_eps": 1e-06,
            "rope_scaling": {
                "mrope_interleaved": True,
                "mrope_section": t["mrope_section"],
                "rope_type": "default",
            },
            "rope_theta": 5000000,
            "use_cache": True,
            "vocab_size": vocab_size,
        },
        "tie_word_embeddings": False,
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "deepstack_visual_indexes": v["deepstack_visual_indexes"],
            "depth": v["depth"],
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": v["hidden_size"],
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": v["intermediate_size"],
            "model_type": "qwen3_vl_moe",
            "num_heads": v["num_heads"],
            "num_position_embeddings": 2304,
            "out_hidden_size": t["hidden_size"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }


# -- chat template: Qwen3-VL-Thinking's, the generation prompt opens <think> ---

CHAT_TEMPLATE = r"""{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- macro render_content(content, do_vision_count) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is none -%}
        {{- '' -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' -%}
                {%- if do_vision_count -%}{%- set image_count.value = image_count.value + 1 -%}{%- endif -%}
                {%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif 'video' in item or item.type == 'video' -%}
                {%- if do_vision_count -%}{%- set video_count.value = video_count.value + 1 -%}{%- endif -%}
                {%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in item -%}
                {{- item.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if messages[0].role == 'system' -%}
        {{- render_content(messages[0].content, false) + '\n\n' -}}
    {%- endif -%}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        ~ "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" -}}
    {%- for tool in tools -%}
        {{- "\n" -}}
        {{- tool | tojson -}}
    {%- endfor -%}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        ~ "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        ~ "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" -}}
{%- else -%}
    {%- if messages[0].role == 'system' -%}
        {{- '<|im_start|>system\n' + render_content(messages[0].content, false) + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endif -%}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) -%}
{%- for message in messages[::-1] -%}
    {%- set index = (messages|length - 1) - loop.index0 -%}
    {%- if ns.multi_step_tool and message.role == "user" -%}
        {%- set content = render_content(message.content, false) -%}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) -%}
            {%- set ns.multi_step_tool = false -%}
            {%- set ns.last_query_index = index -%}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {%- set content = render_content(message.content, true) -%}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) -%}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' -}}
    {%- elif message.role == "assistant" -%}
        {%- set reasoning_content = '' -%}
        {%- if message.reasoning_content is string -%}
            {%- set reasoning_content = message.reasoning_content -%}
        {%- elif message.reasoning is string -%}
            {%- set reasoning_content = message.reasoning -%}
        {%- else -%}
            {%- if '</think>' in content -%}
                {%- set reasoning_content =
                    content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
                {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
            {%- endif -%}
        {%- endif -%}
        {%- if loop.index0 > ns.last_query_index -%}
            {%- if loop.last or (not loop.last and reasoning_content) -%}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n')
                    + '\n</think>\n\n' + content.lstrip('\n') -}}
            {%- else -%}
                {{- '<|im_start|>' + message.role + '\n' + content -}}
            {%- endif -%}
        {%- else -%}
            {{- '<|im_start|>' + message.role + '\n' + content -}}
        {%- endif -%}
        {%- if message.tool_calls -%}
            {%- for tool_call in message.tool_calls -%}
                {%- if (loop.first and content) or (not loop.first) -%}{{- '\n' -}}{%- endif -%}
                {%- if tool_call.function -%}{%- set tool_call = tool_call.function -%}{%- endif -%}
                {{- '<tool_call>\n{"name": "' -}}
                {{- tool_call.name -}}
                {{- '", "arguments": ' -}}
                {%- if tool_call.arguments is string -%}
                    {{- tool_call.arguments -}}
                {%- else -%}
                    {{- tool_call.arguments | tojson -}}
                {%- endif -%}
                {{- '}\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == "tool" -%}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n<think>\n' -}}
{%- endif -%}
"""

# -- a small built-in corpus for the tokenizer ---------------------------------

_CORPUS_TEXT = """\
The service runs a large vision language model on a node with eight GPUs. A researcher
starts it inside a SLURM allocation, checks the preflight report, and sends requests with
images and short videos. The model reads the picture, thinks step by step, and answers.
Describe this image. What is shown in the video? Count the objects on the table and name
their colours: red, green, blue, yellow, orange, purple, black, white, grey and brown.
A cat sits on a wooden chair next to the window; the sun shines on a small plant.
Two dogs run across the field while a child throws a ball. The sky is clear and bright.
Please answer in one sentence. Think carefully before you answer the question.
The weights are stored in safetensors shards; the index file lists every tensor.
Experts are selected by a router; only a few experts are active for each token.
Attention heads share key and value projections; the cache grows with the context.
Images are split into patches of sixteen by sixteen pixels, merged two by two.
Videos are sampled at two frames per second and grouped in pairs of frames.
def main(argv=None) -> int:
    args = parse(argv)
    return run(args.model, port=8000, host="127.0.0.1")
{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///data/cat.png"}}]}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 65536 262144.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday. January February March April May
June July August September October November December. North south east west; left right.
Hello! How are you today? I am fine, thank you. Good morning, good evening, good night.
"""

# fmt: off
_SYLLABLES = (
    "ka", "ri", "to", "mu", "ne", "sa", "lo", "vi", "de", "pa", "qu", "en", "al", "or", "is", "an",
    "th", "er", "in", "on", "at", "es", "ed", "ing", "ion", "ter", "str", "pre", "con", "com",
    "pro", "ver", "und", "ble", "ment", "ness", "ful", "less", "able", "ous", "ive", "ary", "ity",
    "ize", "tion",
)
# fmt: on


def corpus() -> list[str]:
    """Built-in text plus deterministic pseudo-words, enough for a few thousand BPE merges."""
    rng = random.Random(20251129)
    lines = _CORPUS_TEXT.splitlines()
    words = [w for line in lines for w in line.split()]
    for _ in range(600):
        sentence = []
        for _ in range(rng.randint(6, 14)):
            if rng.random() < 0.5:
                sentence.append(rng.choice(words))
            else:
                sentence.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
        lines.append(" ".join(sentence).capitalize() + ".")
    return lines


# -- writers -------------------------------------------------------------------

# Qwen2's pre-tokenizer regex (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _pad_vocab(tok, size: int):
    """The BPE model's vocabulary filled to size entries with tokens no merge produces.

    Qwen's added tokens then get their real ids (151643...) without training a
    151k-entry BPE on a few kilobytes of text. The fillers are plain printable
    ASCII, so the byte-level decoder renders them as their own text.
    """
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), size):
        vocab[f"<|reserved_{i}|>"] = i
    return Tokenizer.from_str(json.dumps(data))


def build_tokenizer(pad_to: int | None = None):
    """Byte-level BPE like Qwen2's (same regex, NFC, byte-level), plus Qwen's added tokens.

    pad_to: the id of the first added token (Qwen's 151643 for --real-shapes).
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_TARGET,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if pad_to is not None:
        tok = _pad_vocab(tok, pad_to)
    base = tok.get_vocab_size(with_added_tokens=False)
    for text, special in ADDED_TOKENS:  # one at a time: ids follow Qwen's order
        added = AddedToken(
            text, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False
        )
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    ids = token_ids(base)
    for text, want in ids.items():
        got = tok.token_to_id(text)
        if got != want:
            raise RuntimeError(f"added token {text!r} got id {got}, expected {want}")
    return tok, ids


def write_tokenizer(out: Path, tok, ids: dict[str, int]) -> None:
    data = json.loads(tok.to_str())
    _dump(out / "tokenizer.json", data)
    vocab = data["model"]["vocab"]
    _dump(out / "vocab.json", vocab)
    merges = data["model"]["merges"]
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    decoder = {
        str(ids[text]): {
            "content": text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for text, special in ADDED_TOKENS
    }
    _dump(
        out / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": [
                "<|im_start|>",
                "<|im_end|>",
                "<|object_ref_start|>",
                "<|object_ref_end|>",
                "<|box_start|>",
                "<|box_end|>",
                "<|quad_start|>",
                "<|quad_end|>",
                "<|vision_start|>",
                "<|vision_end|>",
                "<|vision_pad|>",
                "<|image_pad|>",
                "<|video_pad|>",
            ],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 262144,
            "pad_token": "<|endoftext|>",
            "processor_class": "Qwen3VLProcessor",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def write_processor_configs(out: Path) -> None:
    # Values as in the real checkpoint (patch 16, merge 2, temporal 2, mean/std 0.5).
    common = {
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
    }
    _dump(
        out / "preprocessor_config.json",
        {
            "size": {"longest_edge": 16777216, "shortest_edge": 65536},
            **common,
            "image_processor_type": "Qwen2VLImageProcessor",
        },
    )
    _dump(
        out / "video_preprocessor_config.json",
        {
            "size": {"longest_edge": 25165824, "shortest_edge": 4096},
            **common,
            "fps": 2,
            "min_frames": 4,
            "max_frames": 768,
            "do_sample_frames": True,
            "video_processor_type": "Qwen3VLVideoProcessor",
        },
    )
    _dump(out / "processor_config.json", {"processor_class": "Qwen3VLProcessor"})


def write_generation_config(out: Path, ids: dict[str, int]) -> None:
    # Sampling defaults of the Thinking model card (top_p 0.95, top_k 20, temperature 1.0).
    _dump(
        out / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "do_sample": True,
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
            "temperature": 1.0,
            "top_k": 20,
            "top_p": 0.95,
        },
    )


def _param_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and checkpoint shapes of every tensor, from transformers' own model class."""
    import torch
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    cfg = Qwen3VLMoeConfig(**json.loads(json.dumps(config)))
    with torch.device("meta"):
        model = Qwen3VLMoeForConditionalGeneration(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        # Trap: transformers 5 holds fused experts as [E, 2I, H] / [E, H, I], but
        # released Qwen3-VL-MoE checkpoints store [E, H, 2I] / [E, I, H] (vLLM
        # loads them with is_fused_checkpoint_transposed=True; transformers'
        # conversion_mapping transposes on load and does not undo it on save).
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            shape = (shape[0], shape[2], shape[1])
        shapes[name] = shape
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], gen):
    import torch

    if len(shape) == 1 and ("norm" in name and name.endswith(".weight")):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)


def write_weights(out: Path, config: dict[str, Any], seed: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, Any]] = [{}]
    size = 0
    total = 0
    for name, shape in sorted(_param_shapes(config).items()):
        t = _random_tensor(name, shape, gen).contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    if len(shards) < 2:
        raise RuntimeError("expected at least two shards; lower MAX_SHARD_BYTES")
    n = len(shards)
    weight_map: dict[str, str] = {}
    paths = []
    for i, tensors in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        (out / fname).chmod(0o644)  # safetensors writes 0600; keep it like the other files
        weight_map.update(dict.fromkeys(tensors, fname))
        paths.append(out / fname)
    _dump(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    return paths


# The file that marks a folder as one generate() wrote (and may write again).
MARKER = ".tiny-model"


def generate(
    out_dir: Path,
    seed: int = 0,
    *,
    fp8: bool = False,
    real_shapes: bool = False,
    layers: int | None = None,
    log=None,
) -> Path:
    """Write the model to out_dir (created if needed) and return it.

    Default: the tiny bfloat16 model of the CPU demo and tests. fp8: block-FP8
    weights in the published checkpoint's layout (fp8_checkpoint). real_shapes:
    the published text and vision widths, depth cut to layers (default 94).
    """
    out = Path(out_dir)
    _refuse_foreign(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python -m devtools.tiny_model: random weights\n")
    text, vision = (TEXT_REAL if real_shapes else TEXT_FP8 if fp8 else TEXT), VISION
    if layers is not None:
        text = {**text, "num_hidden_layers": layers}
    if real_shapes:
        vision = vision_cut(min(VISION_REAL["depth"], max(3, text["num_hidden_layers"])))
    tok, ids = build_tokenizer(pad_to=REAL_ADDED_BASE if real_shapes else None)
    padded = -(-tok.get_vocab_size(with_added_tokens=True) // 128) * 128  # like 151936
    vocab_size = REAL_VOCAB if real_shapes else padded
    config = build_config(ids, vocab_size, text, vision)
    for stale in out.glob("model-*-of-*.safetensors"):
        stale.unlink()
    if fp8 or real_shapes:
        # Straight from the layout, no transformers model: at real shapes it would not fit.
        from devtools import fp8_checkpoint

        if fp8:
            config["quantization_config"] = fp8_checkpoint.quantization_config(config)
        tensors = fp8_checkpoint.layout(config, fp8=fp8)
        shard_bytes = REAL_SHARD_BYTES if real_shapes else MAX_SHARD_BYTES
        fp8_checkpoint.write_shards(out, tensors, seed, shard_bytes, log=log)
    else:
        write_weights(out, config, seed)
    _dump(out / "config.json", config)
    write_tokenizer(out, tok, ids)
    write_processor_configs(out)
    write_generation_config(out, ids)
    return out


def _refuse_foreign(out: Path) -> None:
    """OUT must be new, empty, or a model this module wrote (its MARKER): never a real checkpoint,
    whose shards and config.json the generation would replace."""
    from qwen3_vl_service.core.errors import UsageError

    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file, not a folder", fix="give a folder for the model")
    if not out.is_dir() or (out / MARKER).is_file():
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UsageError(
            f"{out} already holds {len(entries)} file(s) not written by tiny_model ({shown}); "
            "generating would replace its config.json and shards",
            fix="give a new or empty folder (a real checkpoint is never overwritten)",
        )


def _check_header(path: Path, fp8: bool) -> None:  # cheap sanity check used by main()
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    allowed = {"BF16", "F8_E4M3"} if fp8 else {"BF16"}
    if not dtypes <= allowed:
        raise RuntimeError(f"{path.name}: unexpected dtypes {sorted(dtypes)}")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    from qwen3_vl_service.core.cli import ArgumentParser, run

    parser = ArgumentParser(
        prog="python -m devtools.tiny_model",
        description="Write a random Qwen3-VL-MoE model (same layout as the real checkpoint).",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="block-quantized FP8 weights (e4m3, 128x128 weight_scale_inv) as the published FP8 checkpoint",
    )
    parser.add_argument(
        "--real-shapes",
        action="store_true",
        help="the published widths (hidden 4096, 64/4 heads, 128 experts, vocab 151936); "
        "use --layers to cut the depth",
    )
    parser.add_argument(
        "--layers", type=_positive, help="text layers (real: 94); the vision depth follows, 3..27"
    )

    def body() -> int:
        args = parser.parse_args(argv)
        started = time.monotonic()
        out = generate(
            args.out_dir,
            seed=args.seed,
            fp8=args.fp8,
            real_shapes=args.real_shapes,
            layers=args.layers,
            log=print,
        )
        shards = sorted(out.glob("model-*-of-*.safetensors"))
        for s in shards:
            _check_header(s, args.fp8)
        size = sum(s.stat().st_size for s in shards)
        took = time.monotonic() - started
        print(f"wrote {out}: {len(shards)} shards, {size / 1e6:.1f} MB in {took:.1f} s")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
