"""The tensor layout of Qwen/Qwen3-VL-235B-A22B-*-FP8, and a writer that streams it to safetensors.

The published FP8 checkpoint (Qwen's fine-grained FP8, the format of
DeepSeek-V3 and Qwen3-*-FP8) keeps, by module:

- **FP8 e4m3 + one ``weight_scale_inv`` per 128x128 block** (shape
  ``[ceil(out/128), ceil(in/128)]``, bfloat16, multiplied on load): every
  linear layer of the text model, i.e. ``self_attn.{q,k,v,o}_proj`` and the
  experts, stored **per expert** (``mlp.experts.{e}.{gate,up,down}_proj``),
  not fused as in the BF16 release (``mlp.experts.gate_up_proj``);
- **bfloat16**: the whole vision tower (``model.visual.*``), the router
  (``mlp.gate``), ``embed_tokens``, ``lm_head`` and every norm
  (``input_layernorm``, ``post_attention_layernorm``, ``q_norm``, ``k_norm``,
  ``model.language_model.norm``).

config.json carries ``quantization_config``: ``quant_method: fp8``,
``fmt: e4m3``, ``activation_scheme: dynamic``, ``weight_block_size: [128, 128]``
and ``ignored_layers``: ``lm_head``, the vision modules and every layer's
``mlp.gate`` (vLLM's ``Fp8Config.from_config`` reads ``ignored_layers``, else
``modules_to_not_convert``). Sources: the published Qwen3-VL FP8 config's
``ignored_layers`` (HabanaAI/vllm-fork#2107 links Qwen3-VL-30B-A3B-Instruct-FP8's;
a verbatim copy of that list, 27 vision blocks + 48 ``mlp.gate`` entries, sits
in verl's ``sglang_rollout/async_sglang_server.py``); the per-expert FP8 names
and bf16 ``weight_scale_inv`` of Qwen's FP8 MoE releases (Qwen3-235B-A22B-FP8's
``modules_to_not_convert`` in vllm-project/llm-compressor#1758; the
official-layout notes of Qwen3.6-35B-A3B-FP8 conversions).

``layout(...)`` lists every tensor (name, shape, kind) without building a
model: at real shapes (hidden 4096, 128 experts) a transformers model would
not fit in host memory. ``write_shards`` generates random data on the GPU
when there is one and writes shard by shard.

torch and safetensors are imported inside the functions: the launcher never
imports this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCK = 128  # weight_block_size [128, 128]
FP8_SCALE = 0.02  # dequantized weight = fp8 value (about N(0, 1)) x scale: N(0, 0.02), like init


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    kind: str  # "fp8" (with a scale_inv companion), "bf16", "norm" (ones), "bias" (zeros), "scale"


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    out, inp = shape
    return (-(-out // BLOCK), -(-inp // BLOCK))


def _linear(name: str, out: int, inp: int, fp8: bool) -> Iterator[Tensor]:
    if fp8:
        yield Tensor(f"{name}.weight", (out, inp), "fp8")
        yield Tensor(f"{name}.weight_scale_inv", scale_shape((out, inp)), "scale")
    else:
        yield Tensor(f"{name}.weight", (out, inp), "bf16")


def text_layer(i: int, t: dict[str, Any], fp8: bool) -> Iterator[Tensor]:
    """One decoder layer of model.language_model, in the published checkpoint's names."""
    p = f"model.language_model.layers.{i}"
    h, hd = t["hidden_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    inter = t["moe_intermediate_size"]
    yield Tensor(f"{p}.input_layernorm.weight", (h,), "norm")
    yield Tensor(f"{p}.post_attention_layernorm.weight", (h,), "norm")
    yield from _linear(f"{p}.self_attn.q_proj", q, h, fp8)
    yield from _linear(f"{p}.self_attn.k_proj", kv, h, fp8)
    yield from _linear(f"{p}.self_attn.v_proj", kv, h, fp8)
    yield from _linear(f"{p}.self_attn.o_proj", h, q, fp8)
    yield Tensor(f"{p}.self_attn.q_norm.weight", (hd,), "norm")
    yield Tensor(f"{p}.self_attn.k_norm.weight", (hd,), "norm")
    yield Tensor(f"{p}.mlp.gate.weight", (t["num_experts"], h), "bf16")
    if not fp8:
        # The BF16 release fuses the experts, stored [E, H, 2I] / [E, I, H].
        yield Tensor(f"{p}.mlp.experts.gate_up_proj", (t["num_experts"], h, 2 * inter), "bf16")
        yield Tensor(f"{p}.mlp.experts.down_proj", (t["num_experts"], inter, h), "bf16")
        return
    for e in range(t["num_experts"]):
        yield from _linear(f"{p}.mlp.experts.{e}.gate_proj", inter, h, fp8)
        yield from _linear(f"{p}.mlp.experts.{e}.up_proj", inter, h, fp8)
        yield from _linear(f"{p}.mlp.experts.{e}.down_proj", h, inter, fp8)


def _vision_linear(name: str, out: int, inp: int) -> Iterator[Tensor]:
    yield Tensor(f"{name}.weight", (out, inp), "bf16")
    yield Tensor(f"{name}.bias", (out,), "bias")


def _layer_norm(name: str, n: int) -> Iterator[Tensor]:
    yield Tensor(f"{name}.weight", (n,), "norm")
    yield Tensor(f"{name}.bias", (n,), "bias")


def vision(v: dict[str, Any]) -> Iterator[Tensor]:
    """The vision tower (always bfloat16), names as transformers' Qwen3VLMoeVisionModel."""
    vh, vi, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    merged = vh * v["spatial_merge_size"] ** 2
    p = "model.visual"
    patch = (vh, v["in_channels"], v["temporal_patch_size"], v["patch_size"], v["patch_size"])
    yield Tensor(f"{p}.patch_embed.proj.weight", patch, "bf16")
    yield Tensor(f"{p}.patch_embed.proj.bias", (vh,), "bias")
    yield Tensor(f"{p}.pos_embed.weight", (v["num_position_embeddings"], vh), "bf16")
    for j in range(v["depth"]):
        b = f"{p}.blocks.{j}"
        yield from _layer_norm(f"{b}.norm1", vh)
        yield from _layer_norm(f"{b}.norm2", vh)
        yield from _vision_linear(f"{b}.attn.qkv", 3 * vh, vh)
        yield from _vision_linear(f"{b}.attn.proj", vh, vh)
        yield from _vision_linear(f"{b}.mlp.linear_fc1", vi, vh)
        yield from _vision_linear(f"{b}.mlp.linear_fc2", vh, vi)
    yield from _layer_norm(f"{p}.merger.norm", vh)
    yield from _vision_linear(f"{p}.merger.linear_fc1", merged, merged)
    yield from _vision_linear(f"{p}.merger.linear_fc2", out, merged)
    for k in range(len(v["deepstack_visual_indexes"])):
        d = f"{p}.deepstack_merger_list.{k}"
        yield from _layer_norm(f"{d}.norm", merged)  # post-shuffle norm: over the merged width
        yield from _vision_linear(f"{d}.linear_fc1", merged, merged)
        yield from _vision_linear(f"{d}.linear_fc2", out, merged)


def layout(config: dict[str, Any], fp8: bool) -> list[Tensor]:
    """Every tensor of the checkpoint for config (config.json's dict), in a stable order."""
    t, v = config["text_config"], config["vision_config"]
    h, vocab = t["hidden_size"], t["vocab_size"]
    tensors = [Tensor("model.language_model.embed_tokens.weight", (vocab, h), "bf16")]
    for i in range(t["num_hidden_layers"]):
        tensors += text_layer(i, t, fp8)
    tensors.append(Tensor("model.language_model.norm.weight", (h,), "norm"))
    tensors.append(Tensor("lm_head.weight", (vocab, h), "bf16"))
    tensors += vision(v)
    return tensors


def ignored_layers(config: dict[str, Any]) -> list[str]:
    """quantization_config.ignored_layers as published: lm_head, the vision modules, every mlp.gate."""
    t, v = config["text_config"], config["vision_config"]
    names = [
        "lm_head",
        "model.visual.merger.linear_fc1",
        "model.visual.merger.linear_fc2",
        "model.visual.merger.norm",
        "model.visual.patch_embed.proj",
        "model.visual.pos_embed",
    ]
    for j in range(v["depth"]):
        for leaf in ("attn.proj", "attn.qkv", "mlp.linear_fc1", "mlp.linear_fc2"):
            names.append(f"model.visual.blocks.{j}.{leaf}")
    for k in range(len(v["deepstack_visual_indexes"])):
        for leaf in ("linear_fc1", "linear_fc2", "norm"):
            names.append(f"model.visual.deepstack_merger_list.{k}.{leaf}")
    names += [f"model.language_model.layers.{i}.mlp.gate" for i in range(t["num_hidden_layers"])]
    return names


def quantization_config(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "ignored_layers": ignored_layers(config),
        "quant_method": "fp8",
        "weight_block_size": [BLOCK, BLOCK],
    }


# -- writing -------------------------------------------------------------------


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _make(t: Tensor, gen, device):
    """Random data for one tensor, on device; returned on the CPU, ready for safetensors."""
    import torch

    if t.kind == "norm":
        return torch.ones(t.shape, dtype=torch.bfloat16)
    if t.kind == "bias":
        return torch.zeros(t.shape, dtype=torch.bfloat16)
    if t.kind == "scale":
        # a little spread between blocks, so a kernel that mixes up blocks shows in the numbers
        s = FP8_SCALE * (0.75 + 0.5 * torch.rand(t.shape, generator=gen, device=device))
        return s.to(torch.bfloat16).cpu()
    x = torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32)
    if t.kind == "fp8":
        # N(0, 1) sits well inside e4m3's range (+-448); the scale brings it to N(0, 0.02)
        return x.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn).cpu()
    return x.mul_(0.02).to(torch.bfloat16).cpu()


def nbytes(t: Tensor) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n * (1 if t.kind == "fp8" else 2)


def plan_shards(tensors: list[Tensor], max_shard_bytes: int) -> list[list[Tensor]]:
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        b = nbytes(t)
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += b
    return shards


def write_shards(out: Path, tensors: list[Tensor], seed: int, max_shard_bytes: int, log=None) -> int:
    """Write tensors as model-0000i-of-0000n.safetensors + model.safetensors.index.json; total bytes."""
    import torch
    from safetensors.torch import save_file

    device = _device()
    gen = torch.Generator(device=device).manual_seed(seed)
    shards = plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        data = {t.name: _make(t, gen, device).contiguous() for t in shard}
        save_file(data, str(out / fname), metadata={"format": "pt"})
        (out / fname).chmod(0o644)  # safetensors writes 0600; keep it like the other files
        total += sum(nbytes(t) for t in shard)
        weight_map.update(dict.fromkeys(data, fname))
        del data
        if log is not None:
            log(f"  {fname}: {len(shard)} tensors ({device.type})")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total
