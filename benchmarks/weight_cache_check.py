"""The cost of verifying a converted-weights cache entry (per-tensor CRC-32s) on a warm load.

Loads ``--model`` (default: the default model, dequantized to ``--dtype``) from its cache entry ``--rounds``
times with the entry's checks on and off (``weight_cache.load_entry(verify=False)``, the behaviour before the
checks), alternating, and prints the medians, their ratio and the verification alone (CRC-32 of every tensor).

    python benchmarks/weight_cache_check.py --model default --dtype float32 --rounds 7
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch

from frugallm import LLM, cpu
from frugallm.loading import weight_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    def load() -> LLM:
        return LLM(args.model, weights="dequantize", dtype=args.dtype, device="cpu")

    load()  # writes the entry if missing
    original = weight_cache.load_entry
    times: dict[str, list[float]] = {"checked": [], "unchecked": []}
    for _ in range(args.rounds):
        for label, verify in (("checked", True), ("unchecked", False)):
            weight_cache.load_entry = functools.partial(original, verify=verify)
            t0 = time.perf_counter()
            llm = load()
            times[label].append(time.perf_counter() - t0)
    weight_cache.load_entry = original
    state = {k: v.contiguous() for k, v in llm.model.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in state.values())
    crc = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        weight_cache._crcs(state)
        crc.append(time.perf_counter() - t0)
    checked, unchecked, crc_s = (statistics.median(times["checked"]), statistics.median(times["unchecked"]),
                                 statistics.median(crc))
    print(f"cpu: {cpu.model_name()} | threads {torch.get_num_threads()} | loadavg {os.getloadavg()}")
    print(f"model {args.model} {args.dtype}: {size / 2**20:.0f} MiB of weights, {args.rounds} rounds (medians)")
    print(f"warm load, entry verified:   {checked:.3f} s")
    print(f"warm load, unverified:       {unchecked:.3f} s")
    print(f"ratio verified / unverified: {checked / unchecked:.3f}")
    print(f"CRC-32 of all tensors alone: {crc_s:.3f} s ({size / crc_s / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
