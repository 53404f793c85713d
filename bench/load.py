"""Seconds to load one decoder block onto the GPU, reading with 1 to N threads (CheckpointReader.load_prefix).

python bench/load.py MODEL --layer 1 --readers 1 2 4 8
"""

from __future__ import annotations

import argparse
import time

import torch

import streamq.io.safetensors_stream as stream
from streamq.model.deepseek import load_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reader = stream.CheckpointReader(args.model)
    load_block(reader, args.layer, device)  # the page cache and the kernels warm, as in a run
    for readers in args.readers:
        stream.READERS = readers
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        block = load_block(reader, args.layer, device)
        torch.cuda.synchronize() if device.type == "cuda" else None
        seconds = time.perf_counter() - start
        size = sum(p.numel() * p.element_size() for p in block.parameters())
        print(f"layer {args.layer}: {readers} reader(s) {seconds:.2f} s for {size / 2**30:.1f} GiB of weights")
        del block
        torch.cuda.empty_cache() if device.type == "cuda" else None


if __name__ == "__main__":
    main()
