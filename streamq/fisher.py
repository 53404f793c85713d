"""The output Fisher of each block: in which directions the model's predictions feel a change of a block's output.

A small change δ of block L's output at a token moves the model's next-token distributions by
KL ≈ ½ δᵀ F_L δ, with F_L the Fisher information of the predictions with respect to that output. This pre-pass
estimates F_L = Σ_t g_t g_tᵀ on the source model, g_t = ∂/∂h_{L,t} Σ_τ log p(y_τ), where every label y_τ is drawn
from the source model's own prediction at τ (the Fisher itself, not the empirical Fisher of the text's next
tokens, which is biased where the model is wrong). A down projection's errors are then weighed by it
(solvers/row_chunks.py): on the trained fixture the KL a down projection's error causes differs by direction by
orders of magnitude (the estimate's spectrum), which the per-matrix GPTQ objective cannot see.

It runs before the block loop, on the first sequences of the calibration set: once forward through the source
blocks, one block in memory at a time, each block's input kept in the work directory; the head draws the labels
and gives the last block's gradient; then back through the blocks in reverse, each block loaded again and its
forward recomputed from its saved input to pass the gradient on. NaN or Inf on the way (a corrupt or overflowing
checkpoint) stops the measurement, not the run: the layers it did not reach are solved without it, and the block
loop stops on the same values with its usual message naming tensor or block and stage. The result, a [hidden,
hidden] float32 matrix per layer asked for, goes to the work directory a layer at a time (host memory holds one:
205 MB at DeepSeek-V3 width), then a marker that it is complete, so a resumed run does not compute it again.
With several processes rank 0 computes it alone while the others wait, and every rank reads it: the same bytes as
one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from streamq.finite import nonfinite_count
from streamq.io.activations import ActivationReader, ActivationSpec, ActivationWriter, dtype_name
from streamq.io.atomic import temporary_name
from streamq.io.safetensors_stream import CheckpointReader
from streamq.model.deepseek import load_block, load_embedding, load_head, rope_cos_sin
from streamq.resume import crash_point

FISHER_DIR = "fisher"
DONE = "complete"
OnStage = Callable[[int, str], None]  # (layer, "forward" or "backward"), for the progress display


def fisher_samples(tokens: int, seq_len: int, samples: int) -> int:
    """Calibration sequences the pre-pass uses for a budget of ``tokens`` (at least one, at most all)."""
    return max(1, min(samples, -(-tokens // seq_len)))


def fisher_done(work: Path) -> bool:
    return (Path(work) / FISHER_DIR / DONE).is_file()


def load_fisher(work: Path, layer: int) -> torch.Tensor | None:
    """Layer ``layer``'s saved estimate, or None when the pre-pass did not measure it."""
    path = _layer_file(work, layer)
    return load_file(str(path))["fisher"] if path.is_file() else None


def _layer_file(work: Path, layer: int) -> Path:
    return Path(work) / FISHER_DIR / f"layer-{layer}.safetensors"


def output_fisher(
    reader: CheckpointReader,
    tokens: torch.Tensor,
    layers: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    work: Path,
    seed: int,
    on_stage: OnStage | None = None,
) -> list[int]:
    """F_L [hidden, hidden] (float32) for each of ``layers``, from ``tokens`` [samples, seq_len], saved in
    ``work``/fisher (``load_fisher``); returns the layers measured (all, unless NaN/Inf got in the way). Holds one
    block, the samples' activations and their gradient in float32. Blocks and head run one sequence at a time, so
    the result does not depend on how many sequences a micro-batch holds (at DeepSeek-V3's 4096 tokens one sequence
    is a large enough batch for a GPU)."""
    cfg = reader.config
    first = min(layers, default=0)
    samples, seq_len = tokens.shape
    spec = ActivationSpec(samples, seq_len, cfg.hidden_size, dtype_name(dtype))
    cos, sin = rope_cos_sin(cfg, seq_len, device)
    folder = Path(work) / FISHER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stage = on_stage or (lambda _layer, _what: None)
    if not layers:
        (folder / DONE).write_text("")
        return []

    def saved(layer: int) -> Path:
        return folder / f"input-{layer}.bin"

    # Forward to the head, keeping the input of every block after the first weighed one (the backward needs them).
    blocks = cfg.num_hidden_layers
    with torch.no_grad():
        hidden = load_embedding(reader, device, dtype)(tokens.to(device))
        for layer in range(blocks):
            stage(layer, "forward")
            if layer > first:  # the first weighed block's own input is never needed
                writer = ActivationWriter(saved(layer), spec)
                writer.write(0, hidden)
                writer.commit()
            block = load_block(reader, layer, device, dtype)
            hidden = torch.cat([block(hidden[s : s + 1], cos, sin) for s in range(samples)])
            del block
    measured: list[int] = []
    grad = _head_gradient(reader, hidden, device, dtype, seed) if nonfinite_count(hidden) == 0 else None
    del hidden
    for layer in range(blocks - 1, first - 1, -1):
        if grad is None or nonfinite_count(grad):
            break
        stage(layer, "backward")
        if layer in layers:
            flat = grad.reshape(-1, grad.shape[-1])
            _save(_layer_file(work, layer), (flat.T @ flat).cpu())
            measured.append(layer)
            crash_point("fisher")
        if layer == first:
            break
        grad = _block_backward(reader, layer, saved(layer), spec, grad, cos, sin, device, dtype)
    for layer in range(first + 1, blocks):
        saved(layer).unlink(missing_ok=True)
    (folder / DONE).write_text("")
    return sorted(measured)


def _head_gradient(
    reader: CheckpointReader, hidden: torch.Tensor, device: torch.device, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    """∂/∂hidden of Σ log p(y) over every position, each y drawn from the model's prediction there; float32."""
    head = load_head(reader, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    grads = []
    for s in range(hidden.shape[0]):  # one sequence at a time: the logits are [seq_len, vocab] in float32
        x = hidden[s : s + 1].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head(x).float().flatten(0, 1)
            probs = torch.softmax(logits.detach(), dim=-1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            (g,) = torch.autograd.grad(loss, x)
        grads.append(g.float())
    return torch.cat(grads)


def _block_backward(
    reader: CheckpointReader,
    layer: int,
    path: Path,
    spec: ActivationSpec,
    grad: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The gradient at block ``layer``'s input, given ``grad`` at its output: its forward recomputed from the saved
    input, one sequence at a time."""
    block = load_block(reader, layer, device, dtype)
    source = ActivationReader(path, spec, ahead=False)
    try:
        out = torch.empty_like(grad)
        for s in range(spec.samples):
            x = source.read(s, s + 1).to(device).requires_grad_(True)
            with torch.enable_grad():
                y = block(x, cos, sin)
                (g,) = torch.autograd.grad(y, x, grad[s : s + 1].to(y.dtype))
            out[s : s + 1] = g.float()
    finally:
        source.close()
    return out


def _save(path: Path, fisher: torch.Tensor) -> None:
    tmp = temporary_name(path)
    save_file({"fisher": fisher.contiguous()}, str(tmp))
    tmp.replace(path)


__all__ = ["fisher_done", "fisher_samples", "load_fisher", "output_fisher"]
