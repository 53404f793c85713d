"""Read a Hugging Face safetensors checkpoint one tensor at a time, memory-mapped.

Every shard's header is parsed and checked when the checkpoint is opened, so a missing shard, a corrupt or
truncated header, or an index that names a tensor a shard does not hold is reported before any work starts,
with the file and the fix. Tensor data is read through a private memory map and the pages are released right
after the copy (``madvise(MADV_DONTNEED)``): file-backed pages that stay mapped count in the process's RSS, and
reading a 700 GB checkpoint must not look like using 700 GB of RAM.

Two expert layouts are read under the same names: DeepSeek's release (``mlp.experts.E.gate_proj.weight``) and
transformers 5's fused one (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]),
which is exposed as per-expert virtual tensors, sliced without reading the other experts.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from streamq.config import ModelConfig
from streamq.errors import StreamqError
from streamq.io.packed import int_bits
from streamq.io.source_quant import CompressedSource, logical_shape
from streamq.kernels.fp8_blocks import dequant_fp8_blocks

# Threads reading a block's tensors at once (CheckpointReader.load_prefix): a copy out of the page cache and to the
# device runs at a few GB/s on one thread.
READERS = 4
# Bytes of a tensor copied out of the map at once (see _MappedFile.read).
READ_PIECE = 64 << 20

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
CT_SCALE_SUFFIX = "_scale"  # compressed-tensors' name for an FP8 weight's block scale
_MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor's bytes live: absolute byte range [start, end) in ``file``."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def select(self, index: int) -> TensorInfo:
        """The sub-tensor ``t[index]``: contiguous, so still one byte range."""
        stride = self.nbytes // self.shape[0]
        start = self.start + index * stride
        return replace(self, shape=self.shape[1:], start=start, end=start + stride)

    def rows(self, first: int, stop: int) -> TensorInfo:
        """The sub-tensor ``t[first:stop]``."""
        stride = self.nbytes // self.shape[0]
        start = self.start + first * stride
        return replace(self, shape=(stop - first, *self.shape[1:]), start=start, end=self.start + stop * stride)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header without reading its data."""

    def corrupt(why: str) -> StreamqError:
        return StreamqError(f"{path}: corrupt or truncated safetensors file ({why}); download this shard again")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise corrupt(f"header length {header_len} exceeds the file size {size}")
            raw = f.read(header_len)
    except OSError as exc:
        raise StreamqError(f"{path}: cannot read ({exc.strerror}); check the file and its permissions") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise corrupt("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _tensor_info(name, entry, path, data_start, size, corrupt)
    return infos


def _tensor_info(name: str, entry: object, path: Path, data_start: int, size: int, corrupt) -> TensorInfo:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise corrupt(f"bad entry for tensor {name!r}") from None
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected or begin < 0:
        raise corrupt(f"tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
    if data_start + end > size:
        raise corrupt(f"tensor {name!r} ends at byte {data_start + end}, the file has {size}")
    return TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)


class _MappedFile:
    """A private, read-only-in-practice memory map of one shard."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            # ACCESS_COPY gives a writable buffer (torch.frombuffer warns on read-only ones); nothing writes to it.
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def read(self, info: TensorInfo, device: torch.device | str = "cpu") -> torch.Tensor:
        """Copy the tensor's bytes out of the map onto ``device``, a piece at a time, dropping each piece's pages from
        this process once copied: a 2 GB embedding then never holds more than one piece of the file in host memory,
        nor (for a GPU) a host copy of itself."""
        out = torch.empty(info.nbytes, dtype=torch.uint8, device=device)
        for first in range(0, info.nbytes, READ_PIECE):
            n = min(READ_PIECE, info.nbytes - first)
            try:
                # From pageable memory the copy returns once the bytes are taken (staged for a GPU).
                out[first : first + n].copy_(
                    torch.frombuffer(self.map, dtype=torch.uint8, count=n, offset=info.start + first)
                )
            except (OSError, RuntimeError) as exc:
                raise StreamqError(
                    f"{self.path}: read error at bytes {info.start}-{info.end} ({exc}); check the disk and the file"
                ) from None
            self._release(info.start + first, info.start + first + n)
        return out.view(info.dtype).reshape(info.shape)

    def _release(self, start: int, end: int) -> None:
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = start - start % mmap.PAGESIZE
        self.map.madvise(mmap.MADV_DONTNEED, first, end - first)

    def close(self) -> None:
        self.map.close()


class CheckpointReader:
    """A checkpoint directory (config.json + index + shards, or a single model.safetensors)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise StreamqError(f"{self.dir}: not a directory; MODEL must be a local checkpoint directory or a repo id")
        self.config = ModelConfig.load(self.dir)
        self.infos = _index_tensors(self.dir)
        self.infos.update(_fused_expert_views(self.infos))
        self._maps: dict[Path, _MappedFile] = {}
        self._maps_lock = threading.Lock()  # load_prefix reads from several threads
        # Packed Linears (a compressed-tensors source such as Kimi-K2-Thinking's INT4 experts, or streamq's own
        # output), read under their dense weight name.
        self.compressed = CompressedSource.from_config(self.config.raw, str(self.dir / "config.json"))
        self.packed_bits = int_bits(self.config.raw)
        self.packed = {n.removesuffix("_packed") for n in self.infos if n.endswith(".weight_packed")}

    # -- discovery ---------------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.infos or name in self.packed

    @property
    def shard_files(self) -> list[Path]:
        return sorted({info.file for info in self.infos.values()})

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.infos if n.startswith(prefix)]

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    # -- reading -----------------------------------------------------------------------------------------------
    def raw(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor exactly as stored."""
        info = self.info(name)
        with self._maps_lock:
            mapped = self._maps.get(info.file)
            if mapped is None:
                mapped = self._maps[info.file] = _MappedFile(info.file)
        return mapped.read(info, device)

    def weight(
        self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
    ) -> torch.Tensor:
        """The tensor in ``dtype``; FP8 weights are dequantized with their block scales on ``device``, and
        pack-quantized ones (streamq's output) with their group scales."""
        if name in self.packed:
            return self._unpack(name, device, dtype)
        return self._convert(*self._fetch(name, device), dtype)

    def _fetch(self, name: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What ``weight`` reads from the files for an unpacked ``name``: the tensor and its FP8 scales, if any."""
        tensor = self.raw(name, device)
        if tensor.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return tensor, None
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.infos:
            scale_name = name + CT_SCALE_SUFFIX
        if scale_name not in self.infos:
            raise StreamqError(
                f"{self.infos[name].file}: FP8 tensor {name} has no {scale_name}; the checkpoint is incomplete"
            )
        return tensor, self.raw(scale_name, device)

    def _convert(self, tensor: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if scale is not None:
            return dequant_fp8_blocks(tensor, scale, self.config.fp8_block or (128, 128), dtype)
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    def _unpack(self, name: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        module = name.removesuffix(".weight")
        if self.compressed is None:
            raise StreamqError(
                f"{self.infos[name + '_packed'].file}: {module} has packed weights but config.json has no "
                "compressed-tensors quantization_config; download the config that belongs to these weights"
            )
        tensors = {}
        for part in self.compressed.scheme_of(module).components():
            tensor_name = f"{module}.{part}"
            if tensor_name not in self.infos:
                raise StreamqError(
                    f"{self.infos[name + '_packed'].file}: packed Linear {module} has no {tensor_name}; "
                    "download the complete checkpoint"
                )
            tensors[part] = self.raw(tensor_name, "cpu" if part == "weight_shape" else device)
        return self.compressed.dequantize(module, tensors).to(dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name`` as the model sees it: a packed Linear's dense [out, in], from the headers."""
        if name not in self.packed:
            return self.info(name).shape
        module = name.removesuffix(".weight")
        if self.compressed is None:
            return tuple(int(d) for d in self.raw(name + "_shape").tolist())
        scheme = self.compressed.scheme_of(module)
        if not scheme.group_size and name + "_shape" in self.infos:
            return tuple(int(d) for d in self.raw(name + "_shape").tolist())
        return logical_shape(scheme, self.info(name + "_packed").shape, self.info(name + "_scale").shape)

    def load_prefix(
        self,
        prefix: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        keep: Callable[[str], bool] = lambda _name: True,
        readers: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """All tensors under ``prefix`` (prefix stripped) that ``keep`` accepts (by stripped name), FP8 weights
        dequantized and their scales dropped; ``readers`` threads (default READERS) read the files ahead of the
        conversion.

        Float32 tensors stay float32 (DeepSeek keeps the router's correction bias in float32)."""
        wanted: list[tuple[str, torch.dtype]] = []
        names = self.names(prefix) + sorted(n for n in self.packed if n.startswith(prefix))
        for name in names:
            packed_part = name not in self.packed and name.rsplit(".", 1)[0] + ".weight" in self.packed
            if _is_fused(name) or _is_component(name, self.infos) or packed_part or not keep(name[len(prefix) :]):
                continue
            stored = self.infos[name].dtype if name in self.infos else dtype
            wanted.append(
                (name, torch.float32 if stored in (torch.float32, torch.float64) and dtype != torch.float64 else dtype)
            )
        out: dict[str, torch.Tensor] = {}
        threads = max(1, readers or READERS)
        window = 2 * threads  # reads ahead of the conversion: the device holds a few raw tensors more
        with ThreadPoolExecutor(threads, thread_name_prefix="streamq-load") as pool:

            def fetch(name: str) -> Future[tuple[torch.Tensor, torch.Tensor | None]] | None:
                return None if name in self.packed else pool.submit(self._fetch, name, device)

            ahead = deque(fetch(name) for name, _ in wanted[:window])
            for i, (name, want) in enumerate(wanted):
                fetched = ahead.popleft()
                if i + window < len(wanted):
                    ahead.append(fetch(wanted[i + window][0]))
                key = name[len(prefix) :]
                out[key] = (
                    self.weight(name, device, want) if fetched is None else self._convert(*fetched.result(), want)
                )
        return out

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise StreamqError(
                f"{self.dir}: tensor {name} is not in this checkpoint; is it a DeepSeek-V3 layout checkpoint?"
            ) from None

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _index_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    index_path = model_dir / INDEX_NAME
    if not index_path.is_file():
        single = model_dir / SINGLE_NAME
        if single.is_file():
            return read_header(single)
        raise StreamqError(f"{model_dir}: no {INDEX_NAME} or {SINGLE_NAME}; is this a safetensors checkpoint?")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = {name: str(file) for name, file in weight_map.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise StreamqError(
            f"{index_path}: not a valid index (needs a 'weight_map' object); download it again"
        ) from None
    headers: dict[str, dict[str, TensorInfo]] = {}
    for file in sorted(set(files.values())):
        path = model_dir / file
        if not path.is_file():
            raise StreamqError(f"{path}: missing shard listed in {INDEX_NAME}; download it again into {model_dir}")
        headers[file] = read_header(path)
    infos: dict[str, TensorInfo] = {}
    for name, file in files.items():
        info = headers[file].get(name)
        if info is None:
            raise StreamqError(
                f"{model_dir / file}: tensor {name} is listed in {INDEX_NAME} but absent from this shard; "
                "the shard and the index disagree: download both again"
            )
        infos[name] = info
    return infos


def _is_component(name: str, infos: dict[str, TensorInfo]) -> bool:
    """A block scale stored beside an FP8 weight (DeepSeek's or compressed-tensors' name)."""
    for suffix in (SCALE_SUFFIX, CT_SCALE_SUFFIX):
        if name.endswith(suffix) and name.removesuffix(suffix) in infos:
            return infos[name.removesuffix(suffix)].dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    return False


_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _is_fused(name: str) -> bool:
    return _FUSED.match(name.removesuffix(SCALE_SUFFIX)) is not None


def _fused_expert_views(infos: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Per-expert names for transformers' fused expert tensors (gate rows first, then up rows)."""
    views: dict[str, TensorInfo] = {}
    for name, info in infos.items():
        match = _FUSED.match(name)
        if not match:
            continue
        prefix, kind = match.groups()
        for e in range(info.shape[0]):
            expert = info.select(e)
            if kind == "down_proj":
                views[f"{prefix}.{e}.down_proj.weight"] = expert
            else:
                half = expert.shape[0] // 2
                views[f"{prefix}.{e}.gate_proj.weight"] = expert.rows(0, half)
                views[f"{prefix}.{e}.up_proj.weight"] = expert.rows(half, 2 * half)
    return views
