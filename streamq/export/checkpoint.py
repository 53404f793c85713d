"""The quantized checkpoint's files: one shard per block, the index, config.json and the side files.

Shards are written tensor by tensor from the source checkpoint (only the packed weights of the block being
written are held in memory), so writing never needs more RAM than one tensor plus one block's packed codes.
Tensors are written in sorted name order so that the bytes depend only on the content.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from streamq.config import ModelConfig
from streamq.distributed import SINGLE, Dist
from streamq.export.compressed_tensors import (
    INDEXER_BF16,
    INDEXER_FP8,
    INDEXER_LINEARS,
    bf16_ignore,
    mtp_ignore,
    plan_quantization_config,
)
from streamq.export.vllm_contract import vllm_config
from streamq.groups import Family, module_family
from streamq.io.atomic import write_atomic
from streamq.io.safetensors_stream import INDEX_NAME, SCALE_SUFFIX, CheckpointReader, read_header
from streamq.io.safetensors_write import Digest, TensorSpec, write_safetensors_together
from streamq.recipe import Plan, Recipe

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj$")
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "tiktoken.model",  # Kimi-K2's tokenizer
    "special_tokens_map.json",
    "chat_template.jinja",
)

Producer = Callable[[], torch.Tensor]
KeepFp8 = Callable[[str], bool]  # module name -> whether its FP8 weight is written as shipped


def _never(_module: str) -> bool:
    return False


def kept_fp8(plan: Plan) -> KeepFp8:
    """Whether a module's FP8 weight is kept as shipped: its family is kept in FP8 by ``plan`` (DeepSeek-V3.2's
    indexer wq_b / wk go with the attention, see ``indexer_in_fp8``)."""
    families = set(plan.kept("fp8"))
    indexer = re.compile(INDEXER_FP8.removeprefix("re:"))

    def keep(module: str) -> bool:
        return (Family.ATTENTION if indexer.match(module) else module_family(module)) in families

    return keep


def stored_dtype(reader: CheckpointReader, name: str) -> torch.dtype:
    """The dtype a tensor is written in when not quantized: as stored, FP8 and packed Linears dequantized to bf16."""
    if name in reader.packed:
        return torch.bfloat16
    dtype = reader.info(name).dtype
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def plan_tensors(
    reader: CheckpointReader,
    names: Iterable[str],
    quantized: Mapping[str, Mapping[str, tuple[torch.dtype, tuple[int, ...]]]],
    packed: Mapping[str, Mapping[str, torch.Tensor]],
    keep_fp8: KeepFp8 = _never,
    dtype: torch.dtype = torch.bfloat16,
    overrides: Mapping[str, torch.Tensor] | None = None,
    keep_experts: bool = False,
) -> dict[str, tuple[TensorSpec, Producer]]:
    """What to write for the source tensors ``names``: for the ``quantized`` modules (their packed layout) the
    tensors in ``packed`` (with several processes, only this rank's modules are there), FP8 weights kept as
    shipped (the modules ``keep_fp8`` names) or dequantized to ``dtype``, routed experts a source ships packed
    copied byte for byte (``keep_experts``) or dequantized, everything else as stored, except the ``overrides``
    (tensors AWQ changed by folding its scales, written as given)."""
    overrides = overrides or {}
    plan: dict[str, tuple[TensorSpec, Producer]] = {}
    for name in names:
        if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in reader:
            continue
        packed_module = name.rsplit(".", 1)[0]
        if packed_module + ".weight" in reader.packed and keep_experts and ROUTED_EXPERT.search(packed_module):
            info = reader.infos[name]
            plan[name] = (TensorSpec(name, info.dtype, info.shape), lambda n=name: reader.raw(n))
            continue
        if packed_module + ".weight" in reader.packed:
            if not name.endswith(".weight_packed"):
                continue  # a packed Linear's other tensors travel with its weight_packed
            name = packed_module + ".weight"  # the Linear as the model sees it
        module = name.removesuffix(".weight")
        info = reader.infos.get(name)
        if name in overrides:
            tensor = overrides[name]
            plan[name] = (TensorSpec(name, tensor.dtype, tuple(tensor.shape)), lambda t=tensor: t)
        elif module in quantized:
            for suffix, (tensor_dtype, shape) in quantized[module].items():
                full = f"{module}.{suffix}"
                plan[full] = (TensorSpec(full, tensor_dtype, shape), lambda m=module, x=suffix: packed[m][x])
        elif info is None:  # a packed source Linear left unquantized: dequantized, like FP8
            plan[name] = (TensorSpec(name, dtype, reader.shape(name)), lambda n=name: reader.weight(n, "cpu", dtype))
        elif info.dtype in FP8_DTYPES and keep_fp8(module):
            scale_info = reader.infos[name + SCALE_SUFFIX]
            plan[name] = (TensorSpec(name, info.dtype, info.shape), lambda n=name: reader.raw(n))
            scale_name = f"{module}.weight_scale"
            plan[scale_name] = (
                TensorSpec(scale_name, torch.float32, scale_info.shape),
                lambda n=name + SCALE_SUFFIX: reader.raw(n).float(),
            )
        elif info.dtype in FP8_DTYPES:
            plan[name] = (TensorSpec(name, dtype, info.shape), lambda n=name: reader.weight(n, "cpu", dtype))
        else:
            plan[name] = (TensorSpec(name, info.dtype, info.shape), lambda n=name: reader.raw(n))
    return dict(sorted(plan.items()))


def write_shard(
    path: Path,
    plan: Mapping[str, tuple[TensorSpec, Producer]],
    on_tensor: Callable[[], None],
    dist: Dist = SINGLE,
    owner: Callable[[str], int] = lambda _name: 0,
    digest: Digest | None = None,
) -> None:
    """Write ``plan``; with several processes each writes the tensors ``owner`` assigns it. ``on_tensor`` runs
    after each tensor is produced (progress, fault injection); ``digest`` receives the file's bytes (rank 0)."""

    def produce(spec: TensorSpec) -> list[torch.Tensor]:
        tensor = plan[spec.name][1]()
        on_tensor()
        return [tensor]

    def owns(spec: TensorSpec) -> bool:
        return owner(spec.name) == dist.rank

    specs = [spec for spec, _ in plan.values()]
    write_safetensors_together(path, specs, produce, owns, dist, {"format": "pt"}, digest)


def write_index(out_dir: Path, shard_files: Iterable[str]) -> None:
    weight_map: dict[str, str] = {}
    total = 0
    for file in sorted(shard_files):
        for name, info in read_header(out_dir / file).items():
            weight_map[name] = file
            total += info.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_atomic(out_dir / INDEX_NAME, json.dumps(index, indent=2) + "\n")


def ignore_list(cfg: ModelConfig, plan: Plan) -> list[str]:
    """Modules a loader must not look for quantized tensors in: lm_head, the router, the MTP layers, and the
    decoder families the plan writes in bf16 (families kept in FP8 are covered by the FP8 group)."""
    ignore = ["lm_head", r"re:.*mlp\.gate$", *mtp_ignore(cfg.num_hidden_layers, cfg.num_nextn_predict_layers)]
    return ignore + bf16_ignore(plan.kept("bf16")) + indexer_ignore(cfg, plan)


def indexer_in_fp8(cfg: ModelConfig, plan: Plan) -> bool:
    """Whether DeepSeek-V3.2's indexer wq_b / wk keep the source's FP8 blocks: exactly when the attention does (the
    FP8 group then covers them). An FP8 group for the indexer alone would become transformers' scheme for every
    non-expert module (it takes the first group whose targets do not name the experts), so never otherwise."""
    return cfg.indexer is not None and Family.ATTENTION in plan.kept("fp8")


def indexer_ignore(cfg: ModelConfig, plan: Plan) -> list[str]:
    """The indexer is never quantized (it only ranks keys, and no loader has a scheme for it): its Linears are
    ignored, except wq_b / wk when they travel in the FP8 group."""
    if cfg.indexer is None:
        return []
    return [INDEXER_BF16 if indexer_in_fp8(cfg, plan) else INDEXER_LINEARS]


def write_config(out_dir: Path, reader: CheckpointReader, recipe: Recipe) -> None:
    """The source config with every attribute vLLM reads set to what streamq computed with (the vLLM contract:
    ``streamq/export/vllm_contract.py``) and its FP8 quantization_config replaced by the compressed-tensors one."""
    cfg = vllm_config(reader.config, reader.infos)
    plan = recipe.plan(reader.config.fp8_block is not None)
    cfg["quantization_config"] = plan_quantization_config(
        plan,
        recipe.solver,
        ignore=ignore_list(reader.config, plan),
        fp8_extra=[INDEXER_FP8] if indexer_in_fp8(reader.config, plan) else [],
        fp8_block=reader.config.fp8_block or (128, 128),
        kept_experts=kept_expert_weights(reader) if plan.kept("keep") else None,
    )
    cfg["torch_dtype"] = "bfloat16"
    write_atomic(out_dir / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def kept_expert_weights(reader: CheckpointReader) -> dict[str, Any]:
    """The source config group's ``weights`` of the routed experts kept as shipped (the preflight checked that
    one group holds them all), declared again as the source declares it."""
    cfg = reader.config
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    assert reader.compressed is not None
    scheme = reader.compressed.scheme_of(f"{reader.layer_prefix(layer)}mlp.experts.0.gate_proj")
    return dict(reader.compressed.raw["config_groups"][scheme.group]["weights"])


def copy_side_files(model_dir: Path, out_dir: Path) -> None:
    # A tiktoken tokenizer's Python file (tokenization_kimi.py) is part of the tokenizer for transformers users.
    code = sorted(p.name for p in Path(model_dir).glob("tokenization_*.py"))
    for name in (*SIDE_FILES, *code):
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, out_dir / name)
