"""Crash safety: the manifest of finished work in OUT, and resuming from it.

Every output file appears atomically (written under a temporary name, fsynced, renamed). After each finished
unit — the embedding/head shard, each block's shard with the activations for the next block, the final files —
the manifest is rewritten atomically with the shard's size and SHA-256, the recipe's digest, and where the
saved activations are. A rerun of the same command finds the first unfinished block and continues from the exact
activations saved for it, so an interrupted run and an uninterrupted one write the same bytes. A rerun with a
different recipe, or over a directory streamq did not write, is refused.

The manifest holds no timings, so it is itself identical between interrupted and uninterrupted runs; per-block
timings live in the work directory and end up in streamq_report.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from streamq.distributed import SINGLE, Dist
from streamq.errors import StreamqError
from streamq.io.activations import ActivationSpec
from streamq.io.atomic import write_atomic
from streamq.recipe import RECIPE_NAME, Recipe

MANIFEST_NAME = "streamq_manifest.json"
EVENTS_LOG = "streamq_events.jsonl"  # the progress log may be opened before the output is
WORK_DIR = ".streamq"
FORMAT = 1
LAYER_SHARD = "layer."  # manifest keys of finished decoder blocks: "layer.N"


@dataclass
class ShardRecord:
    file: str
    bytes: int
    sha256: str


@dataclass
class Manifest:
    recipe: str  # the recipe's digest
    model_config_sha256: str
    total_shards: int
    shards: dict[str, ShardRecord] = field(default_factory=dict)  # "head", "layer.N" -> shard
    next_layer: int = 0  # first block not finished
    activations: str | None = None  # work-dir file holding the input of ``next_layer``
    activation_spec: ActivationSpec | None = None  # the whole set; each rank holds its share
    batch_samples: int | None = None  # sequences per global micro-batch, fixed for the run (see pipeline)
    ranks: int | None = None  # processes the saved activations are split across, while the run is unfinished
    complete: bool = False
    format: int = FORMAT

    @property
    def finished_blocks(self) -> int:
        return sum(key.startswith(LAYER_SHARD) for key in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d: dict[str, Any] = json.loads(text)
        d["shards"] = {k: ShardRecord(**v) for k, v in d["shards"].items()}
        if d.get("activation_spec"):
            d["activation_spec"] = ActivationSpec(**d["activation_spec"])
        return cls(**d)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class OutputDir:
    """OUT: the quantized checkpoint being written, its manifest and its work directory."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = Path(path)
        self.manifest = manifest

    @property
    def work(self) -> Path:
        return self.path / WORK_DIR

    @classmethod
    def open(cls, path: Path, recipe: Recipe, config_sha: str, total_shards: int, ranks: int = 1) -> OutputDir:
        """Start a new output, or pick up the one an interrupted run left, after checking it is ours."""
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if manifest_path.is_file():
            out = cls(path, _read_manifest(manifest_path))
            if out.restarts(recipe, config_sha, ranks):
                out._discard()
                out = cls._new(path, recipe, config_sha, total_shards)
            else:
                out._check_compatible(recipe, config_sha, ranks)
                out._verify_last_shard()
        elif path.exists() and any(p.name != EVENTS_LOG for p in path.iterdir()):
            raise StreamqError(
                f"{path}: exists, is not empty and has no {MANIFEST_NAME}; choose a new or empty OUT directory"
            )
        else:
            out = cls._new(path, recipe, config_sha, total_shards)
        if not out.manifest.complete:
            out.manifest.ranks = ranks
        out.save()
        out.work.mkdir(exist_ok=True)
        out._remove_partial_files()
        return out

    @classmethod
    def _new(cls, path: Path, recipe: Recipe, config_sha: str, total_shards: int) -> OutputDir:
        manifest = Manifest(recipe=recipe.digest(), model_config_sha256=config_sha, total_shards=total_shards)
        path.mkdir(parents=True, exist_ok=True)
        recipe.save(path)
        return cls(path, manifest)

    def restarts(self, recipe: Recipe, config_sha: str, ranks: int) -> bool:
        """True when this unfinished output cannot be resumed by this run but holds no finished block: it is
        then started over instead of refused."""
        if self.manifest.complete or self.manifest.finished_blocks:
            return False
        try:
            self._check_compatible(recipe, config_sha, ranks)
        except StreamqError:
            return True
        return False

    def _discard(self) -> None:
        """Remove what the earlier run wrote (its shards, recipe, work directory and manifest, last)."""
        for record in self.manifest.shards.values():
            (self.path / record.file).unlink(missing_ok=True)
        (self.path / RECIPE_NAME).unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
        self._remove_partial_files()
        (self.path / MANIFEST_NAME).unlink(missing_ok=True)

    @classmethod
    def open_together(cls, path: Path, recipe: Recipe, config_sha: str, total_shards: int, dist: Dist) -> OutputDir:
        """``open`` on rank 0; the other ranks attach once it has checked or created OUT."""
        output = cls.open(path, recipe, config_sha, total_shards, dist.world) if dist.main else None
        dist.barrier()
        return output if output is not None else cls.attach(path, dist.world)

    @classmethod
    def attach(cls, path: Path, ranks: int) -> OutputDir:
        """The output rank 0 has opened (the other ranks of a multi-process run)."""
        out = cls(Path(path), _read_manifest(Path(path) / MANIFEST_NAME))
        if out.manifest.ranks not in (None, ranks):
            raise StreamqError(f"{path}: manifest is for {out.manifest.ranks} processes, this run has {ranks}")
        return out

    def reload(self) -> None:
        self.manifest = _read_manifest(self.path / MANIFEST_NAME)

    def _check_compatible(self, recipe: Recipe, config_sha: str, ranks: int) -> None:
        saved = self.manifest.ranks
        if not self.manifest.complete and self.manifest.activations and saved not in (None, ranks):
            raise StreamqError(
                f"{self.path}: the saved activations are split across {saved} processes; resume with --gpus {saved} "
                "(or the same torchrun --nproc-per-node)"
            )
        if self.manifest.recipe != recipe.digest():
            raise StreamqError(
                f"{self.path}: holds a run with a different recipe{_recipe_changes(self.path / RECIPE_NAME, recipe)} "
                f"(see {self.path / RECIPE_NAME}); rerun with the same options to resume, or choose a new OUT directory"
            )
        if self.manifest.model_config_sha256 != config_sha:
            raise StreamqError(
                f"{self.path}: was written from a model with a different config.json; choose a new OUT directory"
            )

    def _verify_last_shard(self) -> None:
        """Sizes of all finished shards, and the checksum of the newest (hashing hundreds of GB at every resume
        would cost minutes; a crash can only have touched the newest)."""
        records = list(self.manifest.shards.values())
        for record in records:
            shard = self.path / record.file
            if not shard.is_file() or shard.stat().st_size != record.bytes:
                raise StreamqError(f"{shard}: missing or changed since it was finished; delete OUT and start again")
        if records and sha256_file(self.path / records[-1].file) != records[-1].sha256:
            raise StreamqError(f"{self.path / records[-1].file}: checksum mismatch; delete OUT and start again")

    def _remove_partial_files(self) -> None:
        """Temporary files of a killed process: never complete, always safe to delete."""
        for directory in (self.path, self.work):
            for tmp in directory.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)

    def save(self) -> None:
        write_atomic(self.path / MANIFEST_NAME, self.manifest.to_json())

    def record_shard(self, key: str, file: str, sha256: str | None = None) -> ShardRecord:
        """Record a finished shard; ``sha256``: its digest when the writer computed it (else it is read back)."""
        shard = self.path / file
        record = ShardRecord(file, shard.stat().st_size, sha256 or sha256_file(shard))
        self.manifest.shards[key] = record
        return record

    def commit(self, dist: Dist = SINGLE) -> None:
        """Rank 0 writes the manifest; every rank then continues from what it says."""
        if dist.main:
            self.save()
        dist.barrier()
        if not dist.main:
            self.reload()

    def start_activations(self, spec: ActivationSpec, batch_samples: int) -> None:
        """The embedding's output is saved: block 0 starts from it, in micro-batches of ``batch_samples``."""
        self.manifest.activation_spec = spec
        self.manifest.batch_samples = batch_samples
        self.activations_ready(0)

    def activations_ready(self, layer: int) -> None:
        """The input of block ``layer`` is saved: a rerun continues from it."""
        self.manifest.next_layer = layer
        self.manifest.activations = self.activation_path(layer).name

    def mark_complete(self) -> None:
        self.manifest.complete = True
        self.manifest.activations = None
        self.manifest.ranks = None
        self.save()

    def activation_path(self, layer: int, dist: Dist = SINGLE) -> Path:
        """This rank's share of the activations entering ``layer`` (the whole set with one process)."""
        suffix = "" if dist.world == 1 else f".rank{dist.rank}-of-{dist.world}"
        return self.work / f"activations-{layer:05d}{suffix}.bin"

    def float_activation_path(self, layer: int, dist: Dist = SINGLE) -> Path:
        """This rank's share of the *unquantized* model's activations entering ``layer`` (a float target's second
        stream); block 0's input is the embedding's output, the same for both streams."""
        if layer == 0:
            return self.activation_path(0, dist)
        suffix = "" if dist.world == 1 else f".rank{dist.rank}-of-{dist.world}"
        return self.work / f"float-activations-{layer:05d}{suffix}.bin"

    def timings_path(self, key: str) -> Path:
        return self.work / f"report-{key}.json"


def peek_manifest(out: Path) -> Manifest | None:
    """OUT's manifest, read without changing anything, or None when there is none."""
    path = Path(out) / MANIFEST_NAME
    return _read_manifest(path) if path.is_file() else None


def _read_manifest(path: Path) -> Manifest:
    try:
        manifest = Manifest.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise StreamqError(f"{path}: unreadable manifest ({exc}); delete OUT and start again") from None
    if manifest.format != FORMAT:
        raise StreamqError(f"{path}: manifest format {manifest.format}, this streamq writes {FORMAT}; use a new OUT")
    return manifest


def crash_point(name: str) -> None:
    """Fault injection for the crash-safety tests: ``STREAMQ_CRASH_AT=name:n`` kills this process with SIGKILL
    the n-th time (1-based) execution reaches ``name``; ``name:n@r`` only the process of rank r. Unset in normal
    use."""
    spec = os.environ.get("STREAMQ_CRASH_AT")
    if not spec or spec.split(":")[0] != name:
        return
    spec, _, rank = spec.partition("@")
    if rank and rank != os.environ.get("RANK", "0"):
        return
    target = int(spec.split(":")[1]) if ":" in spec else 1
    _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if _CRASH_COUNTS[name] == target:
        os.kill(os.getpid(), signal.SIGKILL)


_CRASH_COUNTS: dict[str, int] = {}


def _recipe_changes(saved_path: Path, recipe: Recipe) -> str:
    """``: FIELD saved A, now B; ...`` for the fields that differ from the saved recipe (nested fields dotted, a
    field only one side has is "unset" on the other), or "" when the saved recipe cannot be read. A default that
    changed between versions then shows which options resume the older run."""
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    old, new = _flat(saved), _flat(recipe.to_dict())
    changed = [f"{k} saved {old.get(k, 'unset')}, now {new.get(k, 'unset')}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)]  # fmt: skip
    return ": " + "; ".join(changed) if changed else ""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out
