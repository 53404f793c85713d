"""Train a tiny DeepSeek-V3-layout MoE on tinyshakespeare and save it as a release-format (FP8) test fixture.

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 bench/train_tiny_moe.py --text .data/tinyshakespeare.txt --out OUT
    PYTHONPATH=$PWD python3 bench/train_tiny_moe.py --smoke --text .data/tinyshakespeare.txt --out /tmp/tiny  # CPU
    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 bench/train_tiny_moe.py --preset bpe --tokenizer TOK --out OUT

``--preset bpe`` is the larger option (not committed; train it on a GPU): a DeepSeek-V3 BPE vocabulary cut down to
the tokens the text uses (``restricted_bpe``: the source tokenizer's pre-tokenizer, byte-level alphabet and merge
order, keeping only the merges that build the text's tokens, checked to tokenize the whole text exactly as the
source tokenizer does), and a wider model with more experts (hidden 384, 6 layers, 64 experts in 8 groups, top-6
from 4 groups). With ~12k tokens in the vocabulary instead of 256 bytes, and more experts per token, quantization
error reaches the next-token distribution through many more logits, so KL differences between methods stand
further above the spread over calibration seeds than on the byte-level fixture.

Random weights say little about quantization quality, so tests and benchmarks need a model that has learned
something, in exactly the layout streamq quantizes: MLA with q_lora_rank, dense first layer, sigmoid router with
group-limited top-k and a correction bias, routed and shared experts, YaRN rope, FP8 e4m3 weights with 128x128
block scales, several shards and an index. Every quantized Linear's input dim is a multiple of 128.

The forward is streamq.model.deepseek's own modules (MLA, Gate, MLP, Block, Head). Only the MoE dispatch is
replaced for training (``DenseDispatchMoE``): the same function, checked against ``MoE.forward`` at start-up.
The router's correction bias gets no gradient; after each step it moves by ±``bias_update_rate`` towards balanced
load, DeepSeek-V3's auxiliary-loss-free balancing. The vocabulary is bytes (id = byte + 3, ids 0-2 BOS/EOS/pad,
as streamq's byte fallback), written as a tokenizers ``tokenizer.json`` so the fixture loads through
``AutoTokenizer``. Training text: the first 90% of tinyshakespeare (``streamq.data.split_text``); the last 10% is
held out and evaluated with ``streamq.data.load_token_batches(split="eval")``. The learning rate follows
``max(step / steps, elapsed / max_train_seconds)``, so a slower device still finishes its schedule in time.

The output directory gets the checkpoint (``write_release_checkpoint``), its README.md with the numbers below,
and ``metrics.json``. Re-loading the written checkpoint through ``CheckpointReader`` + ``forward_blocks`` is
part of the run: its held-out loss is reported next to the in-memory model's.

Recorded run (tests/fixtures/tiny-moe-shakespeare, 2026-11-23, one NVIDIA H100 80GB HBM3, torch 2.11.0+cu130;
the device lacked compressed-tensors, carried as wheels with PYTHONPATH=/tmp/site:$PWD):
    command        the first line above, with --out /tmp/fx2; the whole script took 91 s
    model          11.30M parameters: 4 layers (layer 0 dense), hidden 256, 32 routed experts in 4 groups, top-4
                   from 2 groups, 1 shared expert, MLA q_lora 256 / kv_lora 128, 4 heads, YaRN x40; vocab 384
    training       1200 steps of 64 x 256 tokens (19.7M tokens, ~20 passes over the split) in 52.8 s
    train split    1.0870 nats/byte (1.568 bits/byte, perplexity 2.97) on 256 windows, dropout off
    held-out       1.5036 nats/byte (2.169 bits/byte, perplexity 4.50) over all 435 windows (110,925 predictions);
                   uniform: ln 384 = 5.951; byte unigram of the training split: 3.35
    FP8 checkpoint 1.5040 re-loaded through CheckpointReader + forward_blocks in bf16 (+0.0004 from FP8 rounding)
    load balance   held-out tokens per expert, min / max (13,920 if perfectly balanced, no idle expert):
                   layer 1 12,371 / 15,394; layer 2 12,653 / 15,331; layer 3 12,013 / 16,593
    size           11.68 MB in 4 shards
    one byte = one token, so per-token and per-byte figures are the same.
An earlier run with 3000 steps and dropout 0.1 (133 s) overfit: held-out 1.35 at step 1000, 2.52 at the end
(train split 0.35); hence the defaults below.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from torch import nn

from streamq.config import ModelConfig
from streamq.data import DataConfig, HFTokenizer, chunk_text, load_token_batches, load_tokenizer, split_text
from streamq.io.safetensors_stream import CheckpointReader
from streamq.model.deepseek import Block, Gate, Head, MoE, RMSNorm, forward_blocks, rope_cos_sin
from streamq.synth import SynthOptions, state_slabs, synth_config, tokenizer_vocab_size, write_release_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = next((d / "shared" / "fixtures" for d in REPO.parents if (d / "shared" / "fixtures").is_dir()), REPO)
DEFAULT_TEXT = SHARED / "text" / "tinyshakespeare.txt"
DEFAULT_BPE = SHARED / "tokenizers" / "deepseek-v3"
COMMAND = (
    "PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 bench/train_tiny_moe.py --text .data/tinyshakespeare.txt --out OUT"
)
BPE_COMMAND = COMMAND.replace("--text .data/tinyshakespeare.txt", "--preset bpe --tokenizer TOK")
EVAL_FRACTION = 0.1

SPECIAL_TOKENS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>")  # DeepSeek's names, ids 0-2
BYTE_OFFSET = len(SPECIAL_TOKENS)

# Config fields over the synth "tiny" preset (which brings DeepSeek's release names, YaRN and FP8 settings).
# Every Linear input dim is a multiple of 128: hidden 256, q_lora 256, kv_lora 128, 4 heads x v 32 = 128,
# expert/shared intermediate 128, dense intermediate 512. 32 experts in 4 groups of 8, top-4 from 2 groups.
MODEL_FIELDS: dict[str, object] = {
    "vocab_size": 384,  # 3 specials + 256 bytes, rounded up to 128
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 256,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "n_routed_experts": 32,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "num_nextn_predict_layers": 0,  # no MTP layer is trained
    "bos_token_id": 0,
    "eos_token_id": 1,
}

# The larger option: hidden 384, q_lora 384, kv_lora 256, 6 heads x v 64 = 384, experts of 128, dense 1024;
# 64 experts in 8 groups, top-6 from 4 groups (DeepSeek-V3: 256 in 8, top-8 from 4). vocab_size comes from
# the tokenizer.
LARGE_FIELDS: dict[str, object] = {
    **MODEL_FIELDS,
    "hidden_size": 384,
    "intermediate_size": 1024,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "q_lora_rank": 384,
    "kv_lora_rank": 256,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_group": 8,
    "topk_group": 4,
}


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 64
    steps: int = 1200
    max_train_seconds: float = 210.0
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Residual dropout. 1 MB of text is little: with 0.1 and 3000 steps the held-out loss bottomed out at 1.35
    # near step 1000 and rose to 2.52 (train 0.35), so the run is short and the dropout higher.
    dropout: float = 0.2
    bias_update_rate: float = 1e-3  # DeepSeek-V3's gamma
    init_std: float = 0.02
    log_every: int = 100
    probe_every: int = 200
    probe_windows: int = 32
    train_eval_windows: int = 256
    eval_batch: int = 64
    held_out_limit: int | None = None  # windows; None: the whole held-out split
    shards: int = 4
    seed: int = 0


@dataclass(frozen=True)
class Preset:
    fixture: str  # directory name of the written checkpoint
    vocab: str  # "bytes" or "bpe"
    fields: dict[str, object]
    train: TrainConfig


PRESETS = {
    "tiny": Preset("tiny-moe-shakespeare", "bytes", MODEL_FIELDS, TrainConfig()),
    # ~270k training tokens instead of 1M bytes: fewer steps before it overfits; a longer time budget for the
    # wider model's dense dispatch (64 experts computed for every token).
    "bpe": Preset(
        "moe-shakespeare-bpe", "bpe", LARGE_FIELDS, TrainConfig(steps=800, max_train_seconds=420.0, dropout=0.25)
    ),
}


SMOKE = TrainConfig(
    seq_len=64,
    batch_size=2,
    steps=3,
    warmup_steps=1,
    log_every=1,
    probe_every=2,
    probe_windows=2,
    train_eval_windows=2,
    eval_batch=2,
    held_out_limit=4,
)


# -- tokenizer -------------------------------------------------------------------------------------------------


def byte_symbols() -> dict[int, str]:
    """The printable character that byte-level tokenizers use for each byte (the GPT-2 convention, which the
    ``tokenizers`` ByteLevel pre-tokenizer applies): printable Latin-1 bytes stand for themselves, the other 68
    are shifted past 255 in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = (b for b in range(256) if b not in printable)
    symbols = {b: chr(b) for b in printable}
    symbols.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return symbols


def byte_tokenizer() -> Tokenizer:
    """Bytes as tokens, with no merges: id = byte + 3, so ids agree with streamq's byte fallback."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: b + BYTE_OFFSET for b, symbol in byte_symbols().items()})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: without merges it would change nothing but speed.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def restricted_bpe(source_dir: Path, text: str) -> Tokenizer:
    """``source_dir``'s byte-level BPE tokenizer keeping only what ``text`` needs: DeepSeek's three specials at
    ids 0-2, the 256 byte symbols (so any text still encodes), every token the text is split into and, from the
    merges, every token that one of those is built from. Kept merges keep their order, so the result splits the
    text exactly as the source tokenizer does (checked), into ids 0..n instead of up to 128k."""
    spec = json.loads((source_dir / "tokenizer.json").read_text(encoding="utf-8"))
    source = Tokenizer.from_str(json.dumps(spec))
    used = {tok for e in source.encode_batch(chunk_text(text, 1 << 16), add_special_tokens=False) for tok in e.tokens}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    parts_of: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges:
        parts_of.setdefault(a + b, []).append((a, b))
    keep, todo = set(used), list(used)
    while todo:
        for pair in parts_of.get(todo.pop(), []):
            for part in pair:
                if part not in keep:
                    keep.add(part)
                    todo.append(part)
    old_ids = spec["model"]["vocab"]
    ordered = [*byte_symbols().values(), *sorted(keep - set(byte_symbols().values()), key=old_ids.__getitem__)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({token: i + BYTE_OFFSET for i, token in enumerate(ordered)})
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [[a, b] for a, b in merges if a + b in keep and a in vocab and b in vocab]
    spec["added_tokens"] = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    ]
    restricted = Tokenizer.from_str(json.dumps(spec))
    for chunk in chunk_text(text, 1 << 16):
        ours = restricted.encode(chunk, add_special_tokens=False).tokens
        if ours != source.encode(chunk, add_special_tokens=False).tokens:
            raise RuntimeError(f"{source_dir}: the restricted vocabulary splits the text differently")
    return restricted


def write_tokenizer(out_dir: Path, tokenizer: Tokenizer) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    bos, eos, pad = SPECIAL_TOKENS
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "add_bos_token": True,  # read by streamq.data: every document starts with BOS
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def load_checked_tokenizer(tokenizer_dir: Path) -> HFTokenizer:
    """The tokenizer as streamq.data loads it, failing if it fell back to bytes, or (for the byte vocabulary, the
    one without merges) disagrees with the ids byte + 3."""
    tokenizer = load_tokenizer(tokenizer_dir, warn=_raise)
    if not isinstance(tokenizer, HFTokenizer):
        raise RuntimeError(f"streamq.data did not load {tokenizer_dir}/tokenizer.json ({tokenizer.name})")
    sample = "First Citizen:\nWe are accounted poor citizens, the patricians good. — Ça va?\n"
    ids = tokenizer.encode([sample])[0]
    merges = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    if tokenizer.bos_id != 0 or (not merges and ids != [b + BYTE_OFFSET for b in sample.encode("utf-8")]):
        raise RuntimeError(f"{tokenizer_dir}: ids are not byte + {BYTE_OFFSET} with BOS 0")
    if tokenizer.tokenizer.decode(ids) != sample:
        raise RuntimeError(f"{tokenizer_dir}: decode(encode(text)) != text")
    return tokenizer


def _raise(message: str) -> None:
    raise RuntimeError(message)


def train_stream(text: str, tokenizer: HFTokenizer) -> torch.Tensor:
    """The training split as one token stream, packed as streamq.data packs a text file (BOS, then the text)."""
    stream = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for ids in tokenizer.encode(chunk_text(split_text(text, "calib", EVAL_FRACTION), 1 << 16)):
        stream.extend(ids)
    return torch.tensor(stream, dtype=torch.int64)


def held_out_windows(text_path: Path, tokenizer_dir: Path, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """All (or the first ``limit``) non-overlapping windows of the held-out split, as streamq.data cuts them."""
    held_out = split_text(text_path.read_text(encoding="utf-8"), "eval", EVAL_FRACTION)
    tokenizer = load_checked_tokenizer(tokenizer_dir)
    tokens = (tokenizer.bos_id is not None) + sum(map(len, tokenizer.encode(chunk_text(held_out, 1 << 16))))
    count = tokens // seq_len if limit is None else min(limit, tokens // seq_len)
    cfg = DataConfig(source=str(text_path), num_samples=count, seq_len=seq_len, split="eval")
    return load_token_batches(cfg, tokenizer_dir, warn=_raise)


def train_windows(text_path: Path, tokenizer_dir: Path, seq_len: int, count: int) -> torch.Tensor:
    cfg = DataConfig(source=str(text_path), num_samples=count, seq_len=seq_len, split="calib", seed=0)
    return load_token_batches(cfg, tokenizer_dir, warn=_raise)


# -- model -------------------------------------------------------------------------------------------------------


class DenseDispatchMoE(MoE):
    """``MoE`` with a training-friendly dispatch: every token goes through every expert, weighted by a mostly
    zero [tokens, experts] routing matrix. The experts side by side are one wide MLP, so a layer is three
    matmuls with no host sync and no per-expert launches: 8x the FLOPs of sparse dispatch at top-4 of 32, still
    faster at this size. Unchosen experts get weight 0, hence zero output and zero gradient: same function."""

    load: torch.Tensor | None = None  # tokens per expert in the last forward, for the bias update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        # DeepSeek scores and selects experts in float32; bf16 ties would change the choice.
        with torch.autocast(x.device.type, enabled=False):
            weights, indices = self.gate(x.float())
        n = len(self.experts)
        self.load = torch.bincount(indices.flatten(), minlength=n)
        routing = torch.zeros(x.shape[0], n, device=x.device, dtype=weights.dtype).scatter(1, indices, weights)
        gate_w = torch.cat([e.gate_proj.weight for e in self.experts])  # [E*I, H]
        up_w = torch.cat([e.up_proj.weight for e in self.experts])
        down_w = torch.cat([e.down_proj.weight for e in self.experts], dim=1)  # [H, E*I]
        hidden = F.silu(F.linear(x, gate_w)) * F.linear(x, up_w)
        # Weighting before the (linear) down projection equals weighting its output.
        hidden = (hidden.view(x.shape[0], n, -1) * routing[..., None].to(hidden.dtype)).flatten(1)
        out = F.linear(hidden, down_w)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


class TinyDeepSeek(nn.Module):
    """Embedding, streamq's Blocks and Head; ``release_state`` renames to the checkpoint's tensor names."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        for block in self.layers:
            if isinstance(block.mlp, MoE):
                block.mlp = DenseDispatchMoE(cfg)
        self.head = Head(cfg)
        self._rope: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, str(device))
        if key not in self._rope:
            self._rope[key] = rope_cos_sin(self.cfg, seq_len, device)
        return self._rope[key]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope(ids.shape[1], ids.device)
        x = self.embed_tokens(ids)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.head(x)

    def moe_layers(self) -> list[DenseDispatchMoE]:
        return [b.mlp for b in self.layers if isinstance(b.mlp, DenseDispatchMoE)]

    def release_state(self) -> dict[str, torch.Tensor]:
        state = {f"model.{name}": t for name, t in self.state_dict().items() if not name.startswith("head.")}
        state["model.norm.weight"] = self.head.norm.weight
        state["lm_head.weight"] = self.head.lm_head.weight
        return state


def build_model(cfg: ModelConfig, device: torch.device, train: TrainConfig) -> TinyDeepSeek:
    torch.manual_seed(train.seed)
    with torch.device(device):
        model = TinyDeepSeek(cfg)
    init_weights(model, train.init_std)
    for moe in model.moe_layers():
        # Steered by the balancing rule alone, never by the loss.
        moe.gate.e_score_correction_bias.requires_grad_(False)
    return model


@torch.no_grad()
def init_weights(model: TinyDeepSeek, std: float) -> None:
    """Normal(0, std) matrices; the projections that write into the residual stream are scaled down by
    sqrt(2 * layers) (GPT-2's rule) so that the stream's variance does not grow with depth."""
    residual_std = std / math.sqrt(2 * model.cfg.num_hidden_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            out_proj = name.endswith(("o_proj", "down_proj"))
            nn.init.normal_(module.weight, std=residual_std if out_proj else std)
        elif isinstance(module, Gate):
            nn.init.normal_(module.weight, std=std)
            module.e_score_correction_bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


def add_residual_dropout(model: TinyDeepSeek, p: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Dropout on what attention and the MLPs add to the residual stream, as forward hooks: the inference
    modules have none. Inactive in eval mode."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p, module.training)

    return [module.register_forward_hook(hook) for block in model.layers for module in (block.self_attn, block.mlp)]


@torch.no_grad()
def dispatch_gap(moe: DenseDispatchMoE, tokens: int = 64) -> float:
    """Relative difference between the training dispatch and ``MoE.forward`` on random inputs (float32)."""
    x = torch.randn(tokens, moe.cfg.hidden_size, device=moe.gate.weight.device)
    ours, reference = moe(x), MoE.forward(moe, x)
    return ((ours - reference).norm() / reference.norm()).item()


@torch.no_grad()
def update_router_bias(model: TinyDeepSeek, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower the others."""
    for moe in model.moe_layers():
        if moe.load is not None:
            load = moe.load.float()
            moe.gate.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))


# -- training ---------------------------------------------------------------------------------------------------


@dataclass
class TrainLog:
    steps: int = 0
    seconds: float = 0.0
    loss: list[tuple[int, float]] = field(default_factory=list)  # (step, mean training loss since last entry)
    held_out: list[tuple[int, float]] = field(default_factory=list)  # (step, loss on the first probe windows)


def learning_rate(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` over ``progress`` in [0, 1]."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def optimizer_for(model: TinyDeepSeek, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},  # norms
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def random_windows(stream: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` tokens at random offsets."""
    starts = torch.randint(0, stream.numel() - cfg.seq_len, (cfg.batch_size, 1), generator=gen, device=gen.device)
    return stream[starts + torch.arange(cfg.seq_len, device=stream.device)]


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction=reduction)


def train_step(
    model: TinyDeepSeek, optimizer: torch.optim.Optimizer, batch: torch.Tensor, cfg: TrainConfig
) -> torch.Tensor:
    """One AdamW step on the loss, then one balancing step on the router biases; returns the loss (no sync)."""
    with torch.autocast(batch.device.type, dtype=torch.bfloat16):
        loss = next_token_loss(model(batch), batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    update_router_bias(model, cfg.bias_update_rate)
    return loss.detach()


def train(
    model: TinyDeepSeek, stream: torch.Tensor, cfg: TrainConfig, probe: Callable[[], float], log: Callable[[str], None]
) -> TrainLog:
    device = stream.device
    optimizer = optimizer_for(model, cfg, device)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    hooks = add_residual_dropout(model, cfg.dropout)
    record = TrainLog()
    running = torch.zeros((), device=device)
    model.train()
    start = time.perf_counter()
    step = 0
    while True:
        progress = max(step / cfg.steps, (time.perf_counter() - start) / cfg.max_train_seconds)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(progress, step, cfg)
        running += train_step(model, optimizer, random_windows(stream, cfg, gen), cfg)
        step += 1
        if step % cfg.log_every == 0:
            mean = (running / cfg.log_every).item()  # the only host sync in the loop
            running.zero_()
            record.loss.append((step, mean))
            log(f"step {step:5d}  loss {mean:.4f}  {time.perf_counter() - start:6.1f} s")
        if step % cfg.probe_every == 0:
            record.held_out.append((step, probe()))
            model.train()
            log(f"step {step:5d}  held-out probe {record.held_out[-1][1]:.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    record.steps, record.seconds = step, time.perf_counter() - start
    for handle in hooks:
        handle.remove()
    model.eval()
    return record


# -- evaluation -------------------------------------------------------------------------------------------------


def mean_loss(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch: int) -> float:
    """Mean next-token loss over all predicted positions of ``windows``, in batches."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(batch):
            total += next_token_loss(logits_of(chunk), chunk, reduction="sum").item()
            count += chunk.shape[0] * (chunk.shape[1] - 1)
    return total / count


def model_logits(model: TinyDeepSeek) -> Callable[[torch.Tensor], torch.Tensor]:
    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            return model(ids)

    return logits_of


@dataclass(frozen=True)
class LayerLoad:
    layer: int
    min_tokens: int
    max_tokens: int
    balanced: float  # tokens per expert under perfect balance
    idle_experts: int


@contextmanager
def gate_choices() -> Iterator[list[torch.Tensor]]:
    """Expert indices chosen by every ``Gate`` that runs inside the ``with`` statement, in call order (a global
    hook, since ``forward_blocks`` builds its modules internally)."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, Gate):
            seen.append(output[1].detach())

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def reloaded_eval(
    reader: CheckpointReader, windows: torch.Tensor, device: torch.device, batch: int
) -> tuple[float, list[LayerLoad]]:
    """Held-out loss of the checkpoint run block by block in bf16, and its tokens per expert for each layer."""
    cfg = reader.config
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    counts = {layer: torch.zeros(cfg.n_routed_experts, dtype=torch.int64, device=device) for layer in moe_layers}

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        with gate_choices() as chosen:
            logits = forward_blocks(reader, ids, device, torch.bfloat16)
        for layer, indices in zip(moe_layers, chosen, strict=True):
            counts[layer] += torch.bincount(indices.flatten(), minlength=cfg.n_routed_experts)
        return logits

    loss = mean_loss(logits_of, windows.to(device), batch)
    balanced = windows.numel() * cfg.num_experts_per_tok / cfg.n_routed_experts
    loads = [LayerLoad(layer, int(c.min()), int(c.max()), balanced, int((c == 0).sum())) for layer, c in counts.items()]
    return loss, loads


# -- output -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    device: str
    date: str
    torch_version: str
    command: str
    params: int
    steps: int
    train_seconds: float
    tokens_seen: int
    train_loss: float  # in-memory model, bf16 autocast, fixed windows of the training split
    held_out_loss: float  # in-memory model, every held-out window
    held_out_loss_checkpoint: float  # the written FP8 checkpoint through CheckpointReader + forward_blocks (bf16)
    held_out_tokens: int
    uniform_loss: float  # ln(vocab_size)
    dispatch_gap: float
    checkpoint_bytes: int
    shards: int
    load: list[LayerLoad]
    loss_curve: list[tuple[int, float]]
    held_out_curve: list[tuple[int, float]]
    train: TrainConfig
    fixture: str = PRESETS["tiny"].fixture
    unit: str = "byte"  # what one token is: "byte", or "token" for the BPE vocabulary


def write_checkpoint(
    out_dir: Path, config: dict[str, object], model: TinyDeepSeek, tokenizer_dir: Path, shards: int
) -> Path:
    state = {name: t.detach().cpu() for name, t in model.release_state().items()}
    return write_release_checkpoint(out_dir, config, state_slabs(state), shards, tokenizer_dir)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def summary_lines(m: Metrics, cfg: ModelConfig) -> list[str]:
    ln2 = math.log(2)
    u = m.unit
    size_note = (
        " (tokens are bytes: loss per token = loss per byte)"
        if u == "byte"
        else f" (vocabulary {cfg.vocab_size}: DeepSeek-V3's BPE restricted to the text's tokens)"
    )
    return [
        f"- command: `{m.command}`",
        f"- device: {m.device}, torch {m.torch_version}, {m.date}",
        f"- model: {m.params / 1e6:.2f}M parameters; {cfg.num_hidden_layers} layers (first {cfg.first_k_dense_replace}"
        f" dense), hidden {cfg.hidden_size}, {cfg.n_routed_experts} routed experts in {cfg.n_group} groups, top-"
        f"{cfg.num_experts_per_tok} from {cfg.topk_group} groups, {cfg.n_shared_experts} shared expert, MLA q_lora "
        f"{cfg.q_lora_rank} / kv_lora {cfg.kv_lora_rank}, {cfg.num_attention_heads} heads, YaRN x{cfg.rope.factor:g}",
        f"- training: {m.steps} steps of {m.train.batch_size} x {m.train.seq_len} tokens ({m.tokens_seen / 1e6:.1f}M "
        f"tokens) in {m.train_seconds:.1f} s; AdamW lr {m.train.lr:g}, bf16 autocast, dropout {m.train.dropout:g}, "
        f"bias update rate {m.train.bias_update_rate:g}",
        f"- train-split loss {m.train_loss:.4f} nats/{u} ({m.train_loss / ln2:.3f} bits/{u}, perplexity "
        f"{math.exp(m.train_loss):.2f}) on {m.train.train_eval_windows} windows",
        f"- held-out loss {m.held_out_loss:.4f} nats/{u} ({m.held_out_loss / ln2:.3f} bits/{u}, perplexity "
        f"{math.exp(m.held_out_loss):.2f}) over {m.held_out_tokens} tokens; uniform would be {m.uniform_loss:.3f}",
        f"- re-loaded FP8 checkpoint (CheckpointReader + forward_blocks, bf16): held-out loss "
        f"{m.held_out_loss_checkpoint:.4f} ({m.held_out_loss_checkpoint - m.held_out_loss:+.4f})",
        f"- checkpoint: {m.checkpoint_bytes / 1e6:.2f} MB in {m.shards} shards{size_note}",
        "- held-out tokens per expert (min / max, perfect balance, idle experts): "
        + "; ".join(
            f"layer {x.layer}: {x.min_tokens} / {x.max_tokens}, {x.balanced:.0f}, {x.idle_experts}" for x in m.load
        ),
    ]


def readme(m: Metrics, cfg: ModelConfig) -> str:
    tokens = (
        "Tokens are bytes (id = byte + 3; 0, 1, 2 are BOS, EOS, pad)."
        if m.unit == "byte"
        else "Tokens are DeepSeek-V3's BPE restricted to the tokens the text uses (0, 1, 2 are BOS, EOS, pad)."
    )
    return "\n".join(
        [
            f"# {m.fixture}",
            "",
            "A small DeepSeek-V3-layout MoE trained on the first 90% of tinyshakespeare by `bench/train_tiny_moe.py`,"
            " stored in DeepSeek's FP8 release layout (e4m3 weights with 128x128 `weight_scale_inv` blocks, bf16 "
            f"norms, embeddings and router, float32 correction bias). {tokens} A test and benchmark fixture for "
            "quantization quality; see the script for how it was trained, and for an earlier run that overfit.",
            "",
            *summary_lines(m, cfg),
            "",
        ]
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


# -- main -------------------------------------------------------------------------------------------------------------


def run(
    text_path: Path, out: Path, preset: Preset, cfg: TrainConfig, device: torch.device, bpe_source: Path
) -> Metrics:
    def log(message: str) -> None:
        print(message, flush=True)

    fixture = out / preset.fixture
    text = text_path.read_text(encoding="utf-8")
    vocabulary = byte_tokenizer() if preset.vocab == "bytes" else restricted_bpe(bpe_source, text)
    tokenizer_dir = write_tokenizer(out / "tokenizer", vocabulary)
    tokenizer = load_checked_tokenizer(tokenizer_dir)
    fields = {**preset.fields, "vocab_size": tokenizer_vocab_size(tokenizer_dir)}
    config = synth_config(SynthOptions(preset="tiny", mtp=False, overrides=fields, tokenizer_dir=tokenizer_dir))
    (tokenizer_dir / "config.json").write_text(json.dumps(config))  # lets streamq.data check ids against the vocab
    model_cfg = ModelConfig.from_dict(config)

    model = build_model(model_cfg, device, cfg)
    gap = dispatch_gap(model.moe_layers()[0])
    if gap > 1e-4:
        raise RuntimeError(f"the training MoE dispatch differs from MoE.forward (relative {gap:.2e})")
    params = sum(p.numel() for p in model.parameters())
    log(f"{params / 1e6:.2f}M parameters on {device_name(device)}; dispatch gap {gap:.1e}")

    stream = train_stream(text, tokenizer).to(device)
    held_out = held_out_windows(text_path, tokenizer_dir, cfg.seq_len, cfg.held_out_limit).to(device)
    probe_windows = held_out[: cfg.probe_windows]
    log(f"training stream {stream.numel():,} tokens, held-out {held_out.numel():,} tokens")

    def probe() -> float:
        model.eval()
        return mean_loss(model_logits(model), probe_windows, cfg.eval_batch)

    record = train(model, stream, cfg, probe, log)
    train_eval = train_windows(text_path, tokenizer_dir, cfg.seq_len, cfg.train_eval_windows).to(device)
    train_loss = mean_loss(model_logits(model), train_eval, cfg.eval_batch)
    held_out_loss = mean_loss(model_logits(model), held_out, cfg.eval_batch)
    log(f"trained {record.steps} steps in {record.seconds:.1f} s: train {train_loss:.4f}, held-out {held_out_loss:.4f}")

    write_checkpoint(fixture, config, model, tokenizer_dir, cfg.shards)
    reader = CheckpointReader(fixture)
    reloaded_loss, loads = reloaded_eval(reader, held_out, device, cfg.eval_batch)
    metrics = Metrics(
        device=device_name(device),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        torch_version=torch.__version__,
        command=COMMAND if preset.vocab == "bytes" else BPE_COMMAND,
        params=params,
        steps=record.steps,
        train_seconds=round(record.seconds, 1),
        tokens_seen=record.steps * cfg.batch_size * cfg.seq_len,
        train_loss=train_loss,
        held_out_loss=held_out_loss,
        held_out_loss_checkpoint=reloaded_loss,
        held_out_tokens=held_out.shape[0] * (held_out.shape[1] - 1),
        uniform_loss=math.log(model_cfg.vocab_size),
        dispatch_gap=gap,
        checkpoint_bytes=directory_bytes(fixture),
        shards=len(reader.shard_files),
        load=loads,
        loss_curve=record.loss,
        held_out_curve=record.held_out,
        train=cfg,
        fixture=preset.fixture,
        unit="byte" if preset.vocab == "bytes" else "token",
    )
    (fixture / "README.md").write_text(readme(metrics, model_cfg))
    (out / "metrics.json").write_text(json.dumps(asdict(metrics), indent=2) + "\n")
    log("\n".join(summary_lines(metrics, model_cfg)))
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="tinyshakespeare.txt")
    parser.add_argument("--out", type=Path, required=True, help="gets the checkpoint, tokenizer/, metrics.json")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="tiny: the committed fixture")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_BPE, help="source BPE tokenizer for --preset bpe")
    parser.add_argument("--smoke", action="store_true", help="a few tiny steps, to check the script end to end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    cfg = SMOKE if args.smoke else preset.train
    run(args.text, args.out, preset, cfg, torch.device(args.device), args.tokenizer)


if __name__ == "__main__":
    main()
