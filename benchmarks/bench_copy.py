"""Device <-> host KV copy throughput of hiradix's copy twins versus a raw copy of the same
bytes, measured in the same run (CUDA when available, else the CPU twin).

    python benchmarks/bench_copy.py [--tokens 8192] [--layers 32] [--heads 8] [--dim 128] --json OUT
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from hiradix.backends.host_slab import HostSlab

from hiradix.kv_copy import make_copier


def _timed(fn, sync, repeat: int = 5) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    slots = args.tokens * 2
    shape = (slots, args.heads, args.dim)
    k = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(args.layers)]
    v = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(args.layers)]
    slab = HostSlab(args.tokens, layers=args.layers, heads=args.heads, head_dim=args.dim,
                    dtype=torch.bfloat16, pin_memory=cuda)  # fmt: skip
    copier = make_copier(k, v, slab)
    device_idx = torch.randperm(slots, device=device)[: args.tokens]
    host_idx = slab.alloc(args.tokens)
    nbytes = args.tokens * slab.bytes_per_token
    d2h = _timed(lambda: copier.device_to_host(device_idx, host_idx).wait(), sync)
    h2d = _timed(lambda: copier.host_to_device(host_idx, device_idx).wait(), sync)
    # raw medium: one contiguous copy of the same bytes (pinned host <-> device)
    flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host_flat = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    raw_d2h = _timed(lambda: host_flat.copy_(flat, non_blocking=True), sync)
    raw_h2d = _timed(lambda: flat.copy_(host_flat, non_blocking=True), sync)
    out = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "bytes": nbytes,
        "d2h_gbps": nbytes / d2h / 1e9,
        "h2d_gbps": nbytes / h2d / 1e9,
        "raw_d2h_gbps": nbytes / raw_d2h / 1e9,
        "raw_h2d_gbps": nbytes / raw_h2d / 1e9,
    }
    out["d2h_ratio"] = out["d2h_gbps"] / out["raw_d2h_gbps"]
    out["h2d_ratio"] = out["h2d_gbps"] / out["raw_h2d_gbps"]
    print(f"{out['device']}: {nbytes / 2**20:.0f} MiB of KV ({args.tokens} tokens, "
          f"{slab.bytes_per_token} B/token)")  # fmt: skip
    for way in ("d2h", "h2d"):
        print(f"  {way}: hiradix {out[f'{way}_gbps']:6.2f} GB/s   raw {out[f'raw_{way}_gbps']:6.2f} GB/s"
              f"   ratio {out[f'{way}_ratio']:.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
