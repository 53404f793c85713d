"""llm-compressor's side of ``bench/peers.py``: run in llm-compressor's own virtualenv, never in streamq's.

    /tmp/peers-venv/bin/python bench/peers_llmcompressor.py --model HF_DIR --calib IDS.pt --out EXPERTS.safetensors \
        --method gptq --bits 4 [--all-experts] [--dtype float32]

Loads the de-FP8'd copy of the fixture that ``bench/peers.py`` writes (plain weights, per-expert names, no
quantization_config) as transformers' ``DeepseekV3ForCausalLM``, quantizes the routed experts only with
``oneshot`` on exactly the calibration token ids it is given (no shuffling, batch 1, one window per sample),
and saves every routed expert's quantized weight, dequantized to float32, under the checkpoint's per-expert
names, with the scales for checking. This file imports no streamq, so it runs with llm-compressor's pinned
transformers and compressed-tensors. What llm-compressor needs here, and what it does with the experts:

- transformers keeps a DeepSeek-V3 MoE's experts fused (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]);
  ``oneshot`` "linearizes" them into one ``nn.Linear`` per expert and projection before calibrating (it warns and
  does it itself when the model was not loaded through ``load_quantizable_moe``).
- ``moe_calibrate_all_experts`` (default True) runs every expert on every token for the Hessians, while the
  layer's output keeps the router's top-k: llm-compressor's default all-expert calibration. False: routed only.
- GPTQ defaults in 0.14.0.1 equal streamq's: symmetric int, group 128, activation order "static" (= streamq's
  "weight": columns by decreasing Hessian diagonal, groups in natural order), damping 0.01 of the mean diagonal,
  block 128, min-max scales; the sequential pipeline propagates each layer's quantized output to the next.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# Routed experts only, as streamq's default scope: shared experts, dense MLPs, attention and lm_head stay put.
EXPERT_TARGETS = [r"re:.*mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$"]


def scheme(bits: int) -> dict:
    return {
        "group_0": {
            "targets": EXPERT_TARGETS,
            "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128},
        }
    }


def modifier(method: str, bits: int):
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(config_groups=scheme(bits), ignore=["lm_head"])
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(config_groups=scheme(bits), ignore=["lm_head"])


def calibration_dataset(ids: torch.Tensor):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def expert_weights(model: torch.nn.Module, bits: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every quantized expert Linear's weight as llm-compressor would serve it: fake-quantized with its own scales
    (GPTQ has already replaced the weight by its quantized values, for which this changes nothing; RTN's
    QuantizationModifier leaves the weight as it was and quantizes it only at save time), then checked: w / scale
    must be integers in the signed ``bits`` range."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out: dict[str, torch.Tensor] = {}
    worst = 0.0
    qmax = 2 ** (bits - 1) - 1
    for name, module in model.named_modules():
        if not hasattr(module, "weight_scale") or ".experts." not in name:
            continue
        scale = module.weight_scale.detach().float()
        zero = getattr(module, "weight_zero_point", None)
        args = module.quantization_scheme.weights
        weight = fake_quantize(module.weight.detach().float(), scale, None if zero is None else zero.detach(), args)
        full = scale.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)
        codes = weight / full
        worst = max(worst, (codes - codes.round()).abs().max().item())
        if codes.round().min() < -qmax - 1 or codes.round().max() > qmax:
            raise RuntimeError(f"{name}: codes outside the {bits}-bit range")
        # Dequantize from the codes in float32, as streamq's reader does, not from the stored (maybe bf16) weight.
        out[f"{name}.weight"] = (codes.round() * full).contiguous()
        out[f"{name}.weight_scale"] = scale.contiguous()
    return out, {"max_code_residual": worst, "modules": sum(1 for n in out if n.endswith(".weight"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="de-FP8'd HF copy written by bench/peers.py")
    parser.add_argument("--calib", type=Path, required=True, help="int64 [samples, seq_len] token ids (torch.save)")
    parser.add_argument("--out", type=Path, required=True, help="safetensors of dequantized expert weights")
    parser.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--all-experts", action="store_true", help="llm-compressor's moe_calibrate_all_experts")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.load(args.calib)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=calibration_dataset(ids),
        recipe=modifier(args.method, args.bits),
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline="sequential" if args.method == "gptq" else "datafree",
        moe_calibrate_all_experts=args.all_experts,
    )
    seconds = time.perf_counter() - start
    tensors, check = expert_weights(model, args.bits)
    meta = {
        "llmcompressor": llmcompressor.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seconds": f"{seconds:.1f}",
        **{k: str(v) for k, v in check.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=meta)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
