"""Checks before OUT is touched: a run that cannot finish must fail before it writes anything.

Everything here reads only config.json, the safetensors headers (never tensor data: a few seconds for
DeepSeek-V3's 92 k tensors) and the calibration text:

* MODEL and OUT are distinct and neither contains the other;
* every tensor the run reads has the shape and dtype config.json implies, in either expert layout (the release's
  per-expert tensors or transformers 5's fused ``gate_up_proj`` / ``down_proj``), and every FP8 weight has its
  block scale with the grid ceil(out / block) x ceil(in / block) of config.json's ``weight_block_size``;
  nothing is missing (the index and the shards themselves are checked when the reader opens them);
* the quantization scheme fits every Linear in scope: the group size divides each one's in_features;
* the calibration data gives ``num_samples`` x ``seq_len`` tokens (tokenized here, handed to the run).

The group-size rule is the same for every Linear in scope: a Linear it does not fit refuses the run, naming the
tensor, its in_features and the group sizes that fit all of them. Leaving such a Linear unquantized instead
would quietly change what ``--scope`` means, and could not be loaded everywhere: vLLM fuses q_a/kv_a and
gate/up into single Linears that must share one scheme, and transformers applies one integer scheme to every
non-expert module of the config (see export/compressed_tensors.py). DeepSeek-V3 and R1 never hit the rule at
group sizes 32 to 128; a small model does, and the fix is one option.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamq.config import ModelConfig
from streamq.data import load_token_batches
from streamq.errors import StreamqError
from streamq.export.vllm_contract import vllm_mismatches
from streamq.groups import linear_groups, module_family
from streamq.io.safetensors_stream import (
    CT_SCALE_SUFFIX,
    INDEX_NAME,
    SCALE_SUFFIX,
    SINGLE_NAME,
    CheckpointReader,
    TensorInfo,
)
from streamq.model.deepseek import MTP_EXTRAS, Block
from streamq.recipe import Plan, Recipe
from streamq.resume import OutputDir, peek_manifest

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
HEAD_SHARD = "head"  # the manifest key of the first shard, written with the first activations
# Group sizes offered when the chosen one does not fit (what vLLM's WNA16 kernels serve, and coarser ones).
GROUP_SIZES = (32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Checked:
    """What the checks produced for the run: the calibration tokens (None when OUT is past needing them) and
    warnings to show once the display is up."""

    tokens: torch.Tensor | None
    warnings: list[str] = field(default_factory=list)


def check_before_output(model_dir: Path, out: Path, recipe: Recipe, world: int = 1) -> Checked:
    """Every check above, in order of cost; raises StreamqError (one line: file, tensor, fix) on the first
    failure. Nothing is created or changed in OUT."""
    check_paths(Path(model_dir), Path(out))
    if recipe.data.num_samples % world:
        raise StreamqError(f"--num-samples {recipe.data.num_samples} must be a multiple of the {world} processes")
    with CheckpointReader(model_dir) as reader:
        check_tensors(reader)
        check_scheme(reader, recipe)
        # Not an error: transformers loads such an output exactly; vLLM would compute something else.
        warnings = [f"{model_dir}/config.json: {problem}" for problem in vllm_mismatches(reader.config)]
    manifest = peek_manifest(Path(out))
    restart = manifest is not None and OutputDir(Path(out), manifest).restarts(recipe, config_sha(model_dir), world)
    if restart:
        warnings.append(f"{out}: holds an unfinished run of another recipe or model and no finished block; restarting")
    tokens = None
    if manifest is None or restart or (manifest.recipe == recipe.digest() and HEAD_SHARD not in manifest.shards):
        # The tokens make the first activations, once; a run resumed past them does not read them, and one that
        # resume will refuse must be refused without tokenizing first.
        tokens = load_token_batches(recipe.data, Path(model_dir), warn=warnings.append)
    return Checked(tokens, warnings)


def config_sha(model_dir: Path) -> str:
    """The digest of config.json that the manifest keeps (resume refuses another model's output)."""
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()


# -- paths --------------------------------------------------------------------------------------------------------


def check_paths(model_dir: Path, out: Path) -> None:
    model, target = model_dir.resolve(), out.resolve()
    if target == model:
        raise StreamqError(f"OUT {out} is MODEL itself; choose an OUT directory outside {model_dir}")
    if model in target.parents:
        raise StreamqError(f"OUT {out} is inside MODEL {model_dir}; choose an OUT directory outside the model")
    if target in model.parents:
        raise StreamqError(f"MODEL {model_dir} is inside OUT {out}; choose an OUT directory that does not hold it")


# -- tensors against config.json ------------------------------------------------------------------------------------


def check_tensors(reader: CheckpointReader) -> None:
    """Shapes and dtypes of every tensor the run reads, from the headers only."""
    cfg = reader.config
    blocks = _block_kinds(cfg)
    for name, shape in expected_shapes(cfg, blocks):
        info = reader.infos.get(name)
        if info is None:
            if _required(cfg, name):
                raise StreamqError(
                    f"{_index_file(reader)}: tensor {name} is missing, and config.json needs it; "
                    "download the complete checkpoint (index and every shard) or fix config.json"
                )
            continue
        _check_one(reader, name, info, shape)
    for name, info in reader.infos.items():
        if _unexpected(reader, name, blocks):
            raise StreamqError(
                f"{info.file}: tensor {info.name} is not part of the model config.json describes; "
                "check that config.json belongs to these weights"
            )


def expected_shapes(
    cfg: ModelConfig, blocks: dict[bool, dict[str, tuple[int, ...]]]
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the model: experts both per expert and fused (a layer's fused tensors
    come first, so that a wrong fused shape is reported under its own name, not an expert's slice of it)."""
    v, h = cfg.vocab_size, cfg.hidden_size
    yield "model.embed_tokens.weight", (v, h)
    yield "model.norm.weight", (h,)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", (v, h)
    mtp = {"embed_tokens.weight": (v, h), "enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h)}
    mtp |= {"shared_head.norm.weight": (h,), "shared_head.head.weight": (v, h)}
    for layer in range(cfg.num_layers_with_mtp):
        prefix = f"model.layers.{layer}."
        if cfg.is_moe_layer(layer):
            inter = cfg.moe_intermediate_size
            yield prefix + FUSED[0], (cfg.n_routed_experts, 2 * inter, h)
            yield prefix + FUSED[1], (cfg.n_routed_experts, h, inter)
        extras = mtp if layer >= cfg.num_hidden_layers else {}
        for name, shape in (blocks[cfg.is_moe_layer(layer)] | extras).items():
            yield prefix + name, shape


FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _block_kinds(cfg: ModelConfig) -> dict[bool, dict[str, tuple[int, ...]]]:
    """Block parameter shapes for each kind of layer (MoE or dense): every block of a kind has the same ones.
    They come from the model code itself, built on the meta device (no memory)."""
    first: dict[bool, int] = {}
    for layer in range(cfg.num_layers_with_mtp):
        first.setdefault(cfg.is_moe_layer(layer), layer)
    shapes = {}
    for moe, layer in first.items():
        with torch.device("meta"):
            block = Block(cfg, layer)
        shapes[moe] = {name: tuple(t.shape) for name, t in block.state_dict().items()}
    return shapes


def _required(cfg: ModelConfig, name: str) -> bool:
    """Decoder tensors are required; the fused expert tensors are one layout of two (their per-expert views
    are what is required), and the MTP layers are only copied, so a checkpoint may leave them out."""
    layer = _layer_of(name)
    return not name.endswith(FUSED) and (layer is None or layer < cfg.num_hidden_layers)


def _unexpected(reader: CheckpointReader, name: str, blocks: dict[bool, dict[str, tuple[int, ...]]]) -> bool:
    """A decoder-block tensor that the block does not have (building the block would fail on it)."""
    cfg, layer = reader.config, _layer_of(name)
    if layer is None or layer >= cfg.num_hidden_layers or _is_fp8_scale(reader, name):
        return False
    local = name.split(".", 3)[3]
    if local.startswith(MTP_EXTRAS) or local in FUSED:
        return False
    return local not in blocks[cfg.is_moe_layer(layer)]


def _is_fp8_scale(reader: CheckpointReader, name: str) -> bool:
    for suffix in (SCALE_SUFFIX, CT_SCALE_SUFFIX):
        weight = reader.infos.get(name.removesuffix(suffix)) if name.endswith(suffix) else None
        if weight is not None and weight.dtype in FP8:
            return True
    return False


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return None


def _index_file(reader: CheckpointReader) -> Path:
    index = reader.dir / INDEX_NAME
    return index if index.is_file() else reader.dir / SINGLE_NAME


def _check_one(reader: CheckpointReader, name: str, info: TensorInfo, shape: tuple[int, ...]) -> None:
    where = f"{info.file}: tensor {info.name}"
    if not info.dtype.is_floating_point:
        raise StreamqError(f"{where} is {info.dtype}, not a floating-point weight; download this shard again")
    if info.shape != shape:
        raise StreamqError(
            f"{where} has shape {list(info.shape)}, config.json needs {list(shape)}; "
            "the weights and config.json disagree: download both again"
        )
    if info.dtype in FP8 and (info.name != name or name.endswith(FUSED)):
        raise StreamqError(
            f"{where} is fused FP8 experts, which streamq cannot dequantize; use the release's per-expert layout "
            "or a bf16 checkpoint"
        )
    if info.dtype in FP8:
        _check_scale(reader, name, info)


def _check_scale(reader: CheckpointReader, name: str, info: TensorInfo) -> None:
    scale = reader.infos.get(name + SCALE_SUFFIX) or reader.infos.get(name + CT_SCALE_SUFFIX)
    block = reader.config.fp8_block or (128, 128)
    if scale is None:
        raise StreamqError(
            f"{info.file}: FP8 tensor {name} has no {name + SCALE_SUFFIX}; download the complete checkpoint"
        )
    grid = tuple(-(-dim // size) for dim, size in zip(info.shape, block, strict=True))
    if scale.shape != grid or not scale.dtype.is_floating_point or scale.dtype in FP8:
        raise StreamqError(
            f"{scale.file}: tensor {scale.name} is {scale.dtype} {list(scale.shape)}, the {list(info.shape)} FP8 "
            f"weight needs float {list(grid)} (ceil(out/{block[0]}) x ceil(in/{block[1]}), weight_block_size in "
            "config.json); download this shard again or fix weight_block_size"
        )


# -- the scheme against every Linear in scope -------------------------------------------------------------------------


def check_scheme(reader: CheckpointReader, recipe: Recipe) -> None:
    """Each family's group size divides the in_features of every Linear of it that the recipe quantizes (see the
    module docstring), and the families kept in FP8 are FP8 blocks in MODEL."""
    plan = recipe.plan(reader.config.fp8_block is not None)
    _check_fp8_families(reader, recipe, plan)
    linears = dict(_linears_in_scope(reader, recipe))
    given = dict(recipe.schemes)
    for scheme, families in plan.by_scheme().items():
        mine = {n: i for n, i in linears.items() if module_family(n.removesuffix(".weight")) in families}
        options = [f"{f.value}={given[f.value]}" for f in families if f.value in given]
        _check_group_size(reader, scheme.group_size, mine, options)


def _check_group_size(reader: CheckpointReader, group: int, linears: dict[str, int], options: list[str]) -> None:
    """``options``: the --scheme values that gave these Linears the group size (none: --group-size did)."""
    if group == 0 or not linears:
        return
    # Routed experts first: they are the scheme's main target, and the one misfit that --scope cannot avoid.
    misfits = sorted((n for n, i in linears.items() if i % group), key=lambda n: not _is_routed_expert(n))
    if not misfits:
        return
    name, in_features = misfits[0], linears[misfits[0]]
    common = math.gcd(*linears.values())
    fits = ", ".join(["0 (per channel)", *(str(g) for g in GROUP_SIZES if common % g == 0)])
    where = f"{reader.infos[name].file}: tensor {name} has in_features {in_features}, not a multiple of"
    if options:
        raise StreamqError(
            f"{where} the group size {group} of --scheme {', '.join(options)}; give those families a group size "
            f"that fits them all (-gG with G one of {fits}), or another scheme"
        )
    scope = " or --scope experts" if not any(_is_routed_expert(n) for n in misfits) else ""
    raise StreamqError(f"{where} --group-size {group}; use --group-size {fits} (they fit every Linear in scope){scope}")


def _check_fp8_families(reader: CheckpointReader, recipe: Recipe, plan: Plan) -> None:
    """A family kept "as shipped" in FP8 must be FP8 blocks in MODEL, or the output would claim blocks it lacks."""
    families = set(plan.kept("fp8"))
    asked = [f for f, spec in recipe.schemes if spec == "fp8"]
    if asked and reader.config.fp8_block is None:
        raise StreamqError(
            f"{reader.dir / 'config.json'}: --scheme {asked[0]}=fp8 keeps MODEL's FP8 blocks, but MODEL has none "
            f"(no fp8 quantization_config); use --scheme {asked[0]}=bf16 or a quantized scheme"
        )
    decoder = tuple(reader.layer_prefix(layer) for layer in range(reader.config.num_hidden_layers))
    for name, info in reader.infos.items():
        module = name.removesuffix(".weight")
        in_family = name.startswith(decoder) and module_family(module) in families
        if in_family and name.endswith(".weight") and info.dtype not in FP8:
            family = module_family(module)
            assert family is not None
            raise StreamqError(
                f"{info.file}: tensor {name} is {info.dtype}, not FP8 blocks, but its family ({family.value}) is to "
                f"be kept in FP8 as shipped; use --scheme {family.value}=bf16 or a quantized scheme"
            )


def _linears_in_scope(reader: CheckpointReader, recipe: Recipe) -> Iterator[tuple[str, int]]:
    cfg = reader.config
    for layer in range(cfg.num_hidden_layers):
        prefix = reader.layer_prefix(layer)
        for group in linear_groups(cfg, layer, recipe):
            for member in group.members:
                name = f"{prefix}{member}.weight"
                yield name, reader.infos[name].shape[-1]


def _is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name
