"""Mixed recipes: one scheme per family of Linears (``--scheme FAMILY=SPEC``), the old --scope/--unquantized as
special cases of the same plan, and what a mixed run writes, read back by compressed-tensors, transformers and
the vLLM contract."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.utils import match_name

from streamq import pipeline
from streamq.cli import main
from streamq.config import ModelConfig
from streamq.errors import StreamqError
from streamq.export.checkpoint import ignore_list
from streamq.export.compressed_tensors import (
    family_targets,
    fp8_passthrough_targets,
    mtp_ignore,
    plan_quantization_config,
    quantization_config,
)
from streamq.export.vllm_contract import ABSENT, ATTRIBUTES, vllm_values
from streamq.groups import Family, linear_groups, module_family
from streamq.io.safetensors_stream import INDEX_NAME, CheckpointReader
from streamq.recipe import Recipe, describe, parse_scheme, scheme_spec
from streamq.resume import OutputDir
from streamq.solvers.scheme import QuantScheme, SolverConfig
from streamq.synth import SynthOptions, write_synthetic_checkpoint

BRIEF = ("experts=nvfp4", "shared=w8a16", "attention=fp8", "dense=w4a16")


def schemes(*values: str) -> tuple[tuple[str, str], ...]:
    return tuple(tuple(v.split("=")) for v in values)  # type: ignore[misc]


# -- specs, validation, the recipe ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "scheme"),
    [
        ("nvfp4", QuantScheme.preset("nvfp4")),
        ("MXFP4", QuantScheme.preset("mxfp4")),
        ("w4a16", QuantScheme(4, 128, True)),
        ("w8a16", QuantScheme(8, 128, True)),
        ("w8a16-g0", QuantScheme(8, 0, True)),
        ("w3a16-g64-asym", QuantScheme(3, 64, False)),
        ("fp8", "fp8"),
        ("bf16", "bf16"),
    ],
)
def test_scheme_specs_parse_and_print_back(spec: str, scheme: QuantScheme | str) -> None:
    assert parse_scheme(spec) == scheme
    assert parse_scheme(scheme_spec(parse_scheme(spec))) == scheme


def test_the_wna16_specs_are_compressed_tensors_presets() -> None:
    for bits in (4, 8):
        preset = preset_name_to_scheme(f"W{bits}A16", ["Linear"]).weights
        ours = parse_scheme(f"w{bits}a16")
        assert isinstance(ours, QuantScheme)
        assert (ours.bits, ours.group_size, ours.symmetric) == (preset.num_bits, preset.group_size, preset.symmetric)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (("experts=int4",), r"--scheme: 'int4' is not a scheme; use nvfp4, mxfp4, wNa16"),
        (("mlp=w4a16",), r"--scheme mlp=w4a16: unknown family 'mlp'; choose one of experts, shared, dense, attention"),
        (("experts=bf16",), r"--scheme experts=bf16: the routed experts are what streamq quantizes"),
        (("shared=w5a16",), r"--scheme w5a16: bits must be 2, 3, 4 or 8"),
        (("shared",), r"--scheme 'shared': write FAMILY=SPEC, e.g. --scheme shared=w8a16"),
    ],
)
def test_bad_scheme_options_are_one_line_errors(
    values: tuple[str, ...],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    options = [o for value in values for o in ("--scheme", value)]
    monkeypatch.setattr(sys, "argv", ["streamq", "run", str(tmp_path / "model"), str(tmp_path / "out"), *options])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and re.match(r"error: " + message, err), err
    assert not (tmp_path / "out").exists()


def test_the_old_options_are_plans_of_the_same_mechanism() -> None:
    # --scope all: every family the solver's scheme; --unquantized fp8: the rest FP8 where the source has blocks.
    everything = Recipe(scope="all").plan()
    assert everything == Recipe(schemes=schemes("shared=w4a16", "dense=w4a16", "attention=w4a16")).plan()
    assert Recipe(unquantized="fp8").plan() == Recipe(schemes=schemes("shared=fp8", "dense=fp8", "attention=fp8")).plan(
        fp8_source=True
    )
    assert Recipe(unquantized="fp8").plan(fp8_source=False) == Recipe().plan()
    assert Recipe().plan().kept("bf16") == [Family.SHARED, Family.DENSE, Family.ATTENTION]


@pytest.mark.parametrize("fmt", ["int", "nvfp4"])
@pytest.mark.parametrize(("scope", "unquantized"), [("experts", "bf16"), ("experts", "fp8"), ("all", "bf16")])
def test_a_one_scheme_recipe_writes_the_config_it_always_did(fmt: str, scope: str, unquantized: str) -> None:
    scheme = QuantScheme.preset(fmt)  # type: ignore[arg-type]
    recipe = Recipe(solver=SolverConfig(scheme=scheme), scope=scope, unquantized=unquantized)  # type: ignore[arg-type]
    cfg = ModelConfig.from_dict({**_tiny_config(), "quantization_config": {"quant_method": "fp8"}})
    plan = recipe.plan(fp8_source=True)
    keep_fp8 = unquantized == "fp8" and scope == "experts"
    # The one-scheme exporter's config (the scope's targets, the FP8 passthrough) against the plan's.
    legacy_ignore = ["lm_head", r"re:.*mlp\.gate$", *mtp_ignore(cfg.num_hidden_layers, cfg.num_nextn_predict_layers)]
    if scope == "experts" and not keep_fp8:
        legacy_ignore += [r"re:.*self_attn\..*", r"re:.*mlp\.(shared_experts\.)?(gate|up|down)_proj$"]
    legacy = quantization_config(
        scheme,
        recipe.solver,
        ignore=legacy_ignore,
        fp8_targets=fp8_passthrough_targets(scope) if keep_fp8 else None,  # type: ignore[arg-type]
        scope=scope,  # type: ignore[arg-type]
    )
    assert plan_quantization_config(plan, recipe.solver, ignore=ignore_list(cfg, plan)) == legacy
    assert "schemes" not in recipe.to_dict()  # and so the recipe file and its digest are unchanged


def test_the_recipe_file_and_digest_carry_the_schemes(tmp_path: Path) -> None:
    mixed = Recipe(schemes=schemes(*BRIEF))
    assert mixed.to_dict()["schemes"] == {"experts": "nvfp4", "shared": "w8a16", "dense": "w4a16", "attention": "fp8"}
    mixed.save(tmp_path)
    assert Recipe.load(tmp_path / "streamq_recipe.json") == mixed
    other = Recipe(schemes=schemes("experts=nvfp4", "shared=w8a16-g0", "attention=fp8", "dense=w4a16"))
    assert len({Recipe().digest(), mixed.digest(), other.digest()}) == 3

    # Resume refuses an OUT started with another mix.
    out = OutputDir.open(tmp_path / "out", mixed, "sha", 3)
    (out.path / "model-00002-of-00003.safetensors").write_bytes(b"block 0")
    out.record_shard("layer.0", "model-00002-of-00003.safetensors")  # a finished block: only this recipe resumes
    out.save()
    with pytest.raises(StreamqError, match="recipe"):
        OutputDir.open(tmp_path / "out", other, "sha", 3)
    OutputDir.open(tmp_path / "out", Recipe(schemes=schemes(*reversed(BRIEF))), "sha", 3)  # same mix, any order


def test_describe_names_every_family() -> None:
    assert describe(Recipe(schemes=schemes(*BRIEF))) == (
        "GPTQ experts NVFP4, shared W8 g128 sym, dense W4 g128 sym, attention FP8 blocks, act-order, MSE scales, "
        "down projections refined, output Fisher, 128×2048 tokens"
    )
    assert describe(Recipe(method="rtn", schemes=schemes("dense=w8a16-g0"))) == (
        "RTN experts W4 g128 sym, shared bf16, dense W8 per-channel sym, attention bf16, MSE scales, 128×2048 tokens"
    )


def test_awq_needs_one_grid_and_quantized_or_bf16_shared_experts() -> None:
    with pytest.raises(StreamqError, match="searches its scales for one grid, but this recipe quantizes with w4a16"):
        Recipe(method="awq", schemes=schemes("shared=w8a16"))
    with pytest.raises(StreamqError, match="cannot stay FP8"):
        Recipe(method="awq", schemes=schemes("shared=fp8"))
    Recipe(method="awq", schemes=schemes("experts=w8a16", "attention=fp8"))  # one grid; attention not folded into


def test_linear_groups_follow_the_plan() -> None:
    cfg = ModelConfig.from_dict(_tiny_config())
    recipe = Recipe(schemes=schemes("experts=nvfp4", "shared=w8a16"))
    moe, dense = 2, 0
    assert {g.family for g in linear_groups(cfg, moe, recipe)} == {Family.EXPERTS, Family.SHARED}
    assert linear_groups(cfg, dense, recipe) == []
    attention = Recipe(schemes=schemes("attention=w4a16"))
    assert {g.family for g in linear_groups(cfg, dense, attention)} == {Family.ATTENTION}
    assert module_family("model.layers.2.mlp.gate") is None


# -- the config against compressed-tensors' own ModelCompressor -----------------------------------------------------

PRESETS = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16", "w8a16": "W8A16", "w4a16": "W4A16", "fp8": "FP8_BLOCK"}
MODULES = [
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.0.self_attn.q_a_proj",
    "model.layers.0.self_attn.kv_a_proj_with_mqa",
    "model.layers.1.self_attn.o_proj",
    "model.layers.1.mlp.experts.0.gate_proj",
    "model.layers.1.mlp.experts.7.down_proj",
    "model.layers.1.mlp.shared_experts.up_proj",
    "lm_head",
]


def module_tree(names: list[str]) -> torch.nn.Module:
    root = torch.nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(256, 256, bias=False))
    return root


@pytest.mark.parametrize(
    "values",
    [BRIEF, ("experts=w4a16", "shared=w8a16", "dense=w8a16"), ("experts=mxfp4", "attention=fp8", "dense=bf16")],
    ids=["four-formats", "one-format-two-groups", "fp4-fp8-bf16"],
)
def test_the_config_is_what_compressed_tensors_writes_for_the_same_model(values: tuple[str, ...]) -> None:
    """Attach compressed-tensors' presets to the same modules with its API, let ModelCompressor infer the config,
    and compare formats, targets and weight arguments."""
    recipe = Recipe(schemes=schemes(*values))
    plan = recipe.plan()
    ours = QuantizationConfig.model_validate(
        plan_quantization_config(plan, recipe.solver, ignore=["lm_head", *_bf16_ignore(plan)])
    )
    spec = dict(recipe.schemes)
    groups = {
        f"group_{i}": preset_name_to_scheme(PRESETS[spec.get(f.value, "w4a16")], family_targets([f]))
        for i, f in enumerate(Family)
        if spec.get(f.value, "bf16" if f is not Family.EXPERTS else "w4a16") != "bf16"
    }
    model = module_tree(MODULES)
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=["lm_head"]))
    theirs = ModelCompressor.from_pretrained_model(model).quantization_config
    assert ours.format == theirs.format
    for module in MODULES:
        mine, their = _group_of(module, ours), _group_of(module, theirs)
        assert (mine is None) == (their is None), module
        if mine is None or their is None:
            continue
        assert mine.format == their.format, module
        informational = {"observer", "actorder"}  # streamq declares how it solved; the presets leave them unset
        assert mine.weights.model_dump(exclude=informational) == their.weights.model_dump(exclude=informational)
        assert mine.input_activations == their.input_activations, module


def _group_of(module: str, config: QuantizationConfig) -> QuantizationScheme | None:
    if any(match_name(module, target) for target in config.ignore or ()):
        return None
    matches = [g for g in config.config_groups.values() if any(match_name(module, t) for t in g.targets)]
    assert len(matches) <= 1, module  # vLLM and compressed-tensors take the first match: it must be the only one
    return matches[0] if matches else None


def _bf16_ignore(plan) -> list[str]:  # type: ignore[no-untyped-def]
    cfg = ModelConfig.from_dict(_tiny_config())
    return ignore_list(cfg, plan)[2 + cfg.num_nextn_predict_layers :]


def _tiny_config() -> dict:
    from streamq.synth import synth_config

    return synth_config(SynthOptions(preset="tiny"))


# -- a mixed run, end to end ----------------------------------------------------------------------------------------

RUN_ARGS = ("--num-samples", "4", "--seq-len", "32", "--dtype", "float32", "--device", "cpu", "--display", "none")
MIXES = {
    # The example; transformers 5.24 mis-loads NVFP4 fused experts (tests/test_export_compressed_tensors.py).
    "nvfp4-w8a16-w4a16-fp8": BRIEF,
    "mxfp4-bf16-fp8-w4a16": ("experts=mxfp4", "shared=bf16", "dense=fp8", "attention=w4a16"),
}


@pytest.fixture(scope="module", params=list(MIXES))
def mixed_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(source, OUT, the weights streamq solved by module name) of `streamq run ... --scheme ...`, GPTQ, 1 dense
    + 1 MoE block. The solved weights are the block's Linears when its shard is written (float32 run: exactly
    the solver's QuantResult.weight)."""
    root = tmp_path_factory.mktemp(request.param)
    source = write_synthetic_checkpoint(root / "model", SynthOptions(preset="tiny", num_layers=2, dense_layers=1))
    options = [o for value in MIXES[request.param] for o in ("--scheme", value)]
    solved: dict[str, torch.Tensor] = {}
    write = pipeline.start_block_shard

    def capture(path, reader, layer, recipe, done, block, *args):  # type: ignore[no-untyped-def]
        modules = dict(block.named_modules())
        for group in linear_groups(reader.config, layer, recipe):
            for member in group.members:
                solved[reader.layer_prefix(layer) + member] = modules[member].weight.detach().float().clone()
        return write(path, reader, layer, recipe, done, block, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "start_block_shard", capture)
        patch.setattr(sys, "argv", ["streamq", "run", str(source), str(root / "out"), *RUN_ARGS, *options])
        with pytest.raises(SystemExit) as exit_:
            main()
    assert not exit_.value.code
    yield source, root / "out", solved


def decompress(out: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """Every quantized Linear of OUT as compressed-tensors' compressor of its config group decompresses it,
    with the format. Integer scales are widened to float32 first (the value is the same), so the products are
    exact; FP4 comes back in bf16, the one rounding its compressors make."""
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    reader = CheckpointReader(out)
    modules = sorted({n.rsplit(".", 1)[0] for n in reader.infos if n.endswith(".weight_scale")})
    weights = {}
    for module in modules:
        group = _group_of(module, config)
        assert group is not None, module
        parts = {n.removeprefix(module + "."): reader.raw(n) for n in reader.names(module + ".weight")}
        if group.format == "pack-quantized":
            parts["weight_scale"] = parts["weight_scale"].float()
        weight = BaseCompressor.get_value_from_registry(group.format).decompress(parts, group)["weight"]
        weights[module] = (weight, group.format)
    return weights


@pytest.mark.slow
def test_compressed_tensors_decompresses_exactly_what_streamq_solved_per_group(mixed_run: tuple) -> None:
    source, out, solved = mixed_run
    recipe = Recipe.load(out / "streamq_recipe.json")
    plan = recipe.plan()
    theirs = decompress(out)
    formats = {"int": "pack-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
    original, ours = CheckpointReader(source), CheckpointReader(out)
    seen: set[Family] = set()
    for module, (weight, fmt) in theirs.items():
        family = module_family(module)
        assert family is not None, module
        seen.add(family)
        scheme = plan.of(family)
        if scheme == "fp8":  # kept as shipped: the release's FP8 blocks, dequantized as DeepSeek does
            assert fmt == "float-quantized", module
            assert torch.equal(weight.float(), original.weight(module + ".weight", "cpu", torch.float32)), module
            continue
        assert isinstance(scheme, QuantScheme) and fmt == formats[scheme.format], module
        assert torch.equal(weight, solved[module].to(weight.dtype)), module
        # streamq reads its own integer groups back (each with its bits; computed in the bf16 scales' dtype)
        if scheme.format == "int":
            mine = ours.weight(module + ".weight", "cpu", torch.float32)
            assert torch.equal(mine, solved[module].bfloat16().float()), module
        else:
            refused = r"is stored as .(nv|mx)fp4-pack-quantized.*streamq reads pack-quantized sources"
            with pytest.raises(StreamqError, match=refused):
                ours.weight(module + ".weight", "cpu", torch.float32)
        del solved[module]
    assert not solved  # every solved Linear was written, and decompressed
    assert seen == {f for f, s in plan.schemes if s != "bf16"}
    bf16 = [n for n in CheckpointReader(out).infos if module_family(n.removesuffix(".weight")) in plan.kept("bf16")]
    assert all(CheckpointReader(out).infos[n].dtype == torch.bfloat16 for n in bf16)


@pytest.mark.slow
def test_the_mixed_config_satisfies_the_vllm_contract(mixed_run: tuple) -> None:
    source, out, _ = mixed_run
    written = json.loads((out / "config.json").read_text())
    expected = vllm_values(ModelConfig.load(source), set(json.loads((source / INDEX_NAME).read_text())["weight_map"]))
    for attribute in ATTRIBUTES:  # as tests/test_vllm_contract.py checks a one-scheme output
        value: object = written
        for key in attribute.path:
            value = value.get(key, ABSENT) if isinstance(value, dict) else ABSENT
        assert value == expected[attribute.path], attribute.name
    # vLLM fuses q_a/kv_a, gate/up and a layer's experts into single Linears: each set must match one group.
    config = QuantizationConfig.model_validate(written["quantization_config"])
    fused = [
        ("model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa"),
        ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
        ("model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.shared_experts.up_proj"),
        tuple(f"model.layers.1.mlp.experts.{e}.{p}_proj" for e in (0, 15) for p in ("gate", "up", "down")),
    ]
    for members in fused:
        assert len({id(_group_of(m, config)) for m in members}) == 1, members


@pytest.mark.slow
def test_transformers_loads_the_mixed_output(mixed_run: tuple) -> None:
    """transformers 5.24 applies each group to its own non-expert modules when it loads the compressed model
    (the default, dequantize=False) and decompresses the fused experts with the experts' group: every weight is
    what compressed-tensors decompresses, except NVFP4 experts (its fused path drops weight_global_scale).
    ``dequantize=True`` decompresses every non-expert module with one group, which a mix of non-expert
    schemes breaks (see the README)."""
    from transformers import AutoModelForCausalLM

    _, out, _ = mixed_run
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(16).view(1, 16)).logits  # decompresses the non-expert modules
    assert torch.isfinite(logits).all()
    state = model.state_dict()
    for module, (weight, fmt) in decompress(out).items():
        if ".mlp.experts." not in module:
            loaded = state[module + ".weight"]
        elif fmt == "nvfp4-pack-quantized":
            continue
        else:
            prefix, rest = module.split(".mlp.experts.")
            expert, kind = int(rest.split(".")[0]), rest.split(".")[1]
            fused = state[f"{prefix}.mlp.experts.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}"][expert]
            loaded = fused if kind == "down_proj" else fused.chunk(2, 0)[kind == "up_proj"]
        assert torch.equal(loaded.float(), weight.float()), module


# -- checked before OUT is touched ----------------------------------------------------------------------------------


def test_a_family_scheme_that_does_not_fit_is_refused_before_out_exists(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = [str(tiny_checkpoint), str(tmp_path / "out"), *RUN_ARGS, "--scheme", "attention=w4a16-g256"]
    monkeypatch.setattr(sys, "argv", ["streamq", "run", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert (
        "tensor model.layers.0.self_attn.q_b_proj.weight has in_features 384, not a multiple of the group size " in err
    )
    assert (
        "256 of --scheme attention=w4a16-g256; give those families a group size that fits them all (-gG with G "
        "one of 0 (per channel), 32, 64, 128), or another scheme" in err
    )
    assert not (tmp_path / "out").exists()


def test_fp8_is_kept_only_where_the_source_has_fp8_blocks(tiny_checkpoint: Path) -> None:
    from dataclasses import replace

    from streamq.preflight import check_scheme

    reader = CheckpointReader(tiny_checkpoint)
    check_scheme(reader, Recipe(schemes=schemes("attention=fp8")))
    name = "model.layers.1.self_attn.o_proj.weight"
    reader.infos[name] = replace(reader.infos[name], dtype=torch.bfloat16)
    with pytest.raises(StreamqError, match=rf"tensor {name} is torch.bfloat16, not FP8 blocks, but its family "):
        check_scheme(reader, Recipe(schemes=schemes("attention=fp8")))
    check_scheme(reader, Recipe(schemes=schemes("attention=bf16")))

    reader.config = replace(reader.config, fp8_block=None)  # a bf16 release
    with pytest.raises(StreamqError, match=r"--scheme attention=fp8 keeps MODEL's FP8 blocks, but MODEL has none"):
        check_scheme(reader, Recipe(schemes=schemes("attention=fp8")))
    # --unquantized fp8 asks for FP8 only where there is some: a bf16 source gives bf16, as it always did.
    assert Recipe(unquantized="fp8").plan(fp8_source=False).kept("fp8") == []


def test_scheme_options_replace_the_saved_recipes_families_one_by_one() -> None:
    from streamq.cli import build_recipe

    saved = Recipe(schemes=schemes(*BRIEF))
    new = build_recipe(
        saved, data={}, scheme={}, solver={}, top={}, schemes=[("attention", "bf16"), ("shared", "W8A16-g0")]
    )
    assert dict(new.schemes) == {"experts": "nvfp4", "shared": "w8a16-g0", "dense": "w4a16", "attention": "bf16"}
    assert build_recipe(saved, data={}, scheme={}, solver={}, top={}) == saved
