"""Run by test_fp8_checkpoint in a child process: the generated FP8 names against the installed vLLM.

    python tests/fp8_vllm_check.py MODEL_DIR

Uses vLLM's own weight-name mapping for Qwen3VLMoeForConditionalGeneration
(hf_to_vllm_mapper, Qwen3MoeModel's stacked mapping, RoutedExperts'
expert_params_mapping) and its Fp8Config / is_layer_skipped; builds no model
(FP8 does not run on these CPUs). Exit 0 and "ok: N tensors" when every
generated tensor lands on a vLLM parameter and exactly the FP8 ones are quantized.
"""

from __future__ import annotations

import inspect
import json
import struct
import sys
from pathlib import Path

from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.quantization import fp8 as vllm_fp8
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.models.qwen3_moe import Qwen3MoeModel
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration as Model

BF16_LINEARS = (
    "attn.qkv.weight",
    "attn.proj.weight",
    "linear_fc1.weight",
    "linear_fc2.weight",
    "mlp.gate.weight",
)
MOE_PARAMS = {"w13_weight", "w2_weight", "w13_weight_scale_inv", "w2_weight_scale_inv"}


def headers(model_dir: Path) -> dict[str, dict]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out: dict[str, dict] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with open(model_dir / shard, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            out.update({k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"})
    return out


def module_of(mapped: str, experts: list) -> str:
    """The vLLM module a mapped checkpoint name loads into (experts: the fused MoE layer)."""
    if ".mlp.experts." in mapped:
        hits = [(p, w) for p, w, _e, _s in experts if w in mapped]
        assert hits, f"no vLLM expert mapping for {mapped}"
        param, weight = hits[0]
        leaf = mapped.replace(weight, param).rsplit(".", 1)[-1]
        assert leaf in MOE_PARAMS, f"{mapped} -> {leaf}, not a block-FP8 MoE parameter"
        return mapped.split(".mlp.experts.")[0] + ".mlp.experts"
    if mapped.startswith("language_model.model."):
        mapped = Qwen3MoeModel.hf_to_vllm_mapper.map_name(mapped)  # q/k/v -> qkv_proj
    return mapped.rsplit(".", 1)[0]


def main(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    experts = RoutedExperts.build_expert_params_mapping(
        "gate_proj",
        "down_proj",
        "up_proj",
        num_experts=config["text_config"]["num_experts"],
        include_fused=True,
    )
    moe_source = inspect.getsource(vllm_fp8.Fp8MoEMethod)
    assert 'register_parameter("w13_weight"' in moe_source and '"weight_scale_inv"' in moe_source
    quant = vllm_fp8.Fp8Config.from_config(config["quantization_config"])
    quant.packed_modules_mapping = dict(Model.packed_modules_mapping) | {
        "gate_up_proj": ["gate_proj", "up_proj"]
    }
    quant.apply_vllm_mapper(Model.hf_to_vllm_mapper)
    tensors = headers(model_dir)
    for name, header in tensors.items():
        mapped = Model.hf_to_vllm_mapper.map_name(name)
        tops = ("visual.", "language_model.model.", "language_model.lm_head.")
        assert mapped is not None and mapped.startswith(tops), f"{name} -> {mapped}"
        module = module_of(mapped, experts)
        skipped = is_layer_skipped(module, quant.ignored_layers, quant.packed_modules_mapping)
        if header["dtype"] == "F8_E4M3" or name.endswith("weight_scale_inv"):
            assert not skipped, f"{name}: FP8 in the file, but vLLM would load {module} unquantized"
        elif name.endswith(BF16_LINEARS):
            assert skipped, f"{name}: BF16 in the file, but vLLM would quantize {module}"
    print(f"ok: {len(tensors)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
