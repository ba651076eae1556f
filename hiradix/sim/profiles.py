"""Named hardware/model profiles for the simulator, each figure with its source.

Sources (public):

- [H100]  NVIDIA H100 Tensor Core GPU datasheet (SXM5): dense BF16 989 TFLOPS, dense FP8
          1,979 TFLOPS (the "with sparsity" figures are twice these), HBM3 3.35 TB/s,
          PCIe Gen5 "128 GB/s" (bidirectional, i.e. 64 GB/s per direction, x16).
- [L70]   Meta Llama 3 70B config.json: 80 layers, hidden 8192, 64 query heads, 8 KV
          heads (GQA), head_dim 128; 70.6e9 parameters.
- [L8]    Meta Llama 3 8B config.json: 32 layers, hidden 4096, 32 query heads, 8 KV
          heads, head_dim 128; 8.03e9 parameters.
- [FA3]   Shah et al., "FlashAttention-3" (2024): up to 740 TFLOPS BF16 on H100 (75% of
          peak) for attention alone; end-to-end prefill is lower (norms, TP all-reduces).
- [ETH]   IEEE 802.3 line rates: 25GbE = 3.125 GB/s, 100GbE = 12.5 GB/s per direction.
- [NVMe]  Samsung PM9A3 (PCIe Gen4 x4 U.2) datasheet: 6,900 MB/s sequential read,
          4,100 MB/s sequential write.
- [DGX]   NVIDIA DGX BasePOD reference architecture, "Core Components" (DGX H100/H200):
          8 GPUs, 2 TB DDR5, "eight 3.84 TB U.2 NVMe drives for storage/cache", one
          100 Gb/s Ethernet NIC plus ConnectX-7 ports (compute and storage fabrics).

Derived figures (arithmetic shown next to each) and assumptions (marked ASSUMED) are
next to the field they set. ``PROFILES`` maps a name to its :class:`Profile`.
"""

from __future__ import annotations

import logging

from hiradix.sim.cost import LinkSpec, ModelCost, Profile

logger = logging.getLogger(__name__)

GB = 1e9

# Stores (L3). Shared by the profiles; the config's store.kind picks one.
_STORES_100G = {
    # 100GbE: 12.5 GB/s line rate [ETH]; ~80% after TCP/RESP framing -> 10 GB/s (ASSUMED).
    # 0.2 ms per pipelined batch: LAN round trip + Redis processing (ASSUMED).
    "redis_read": LinkSpec(10 * GB, 200e-6),
    "redis_write": LinkSpec(10 * GB, 200e-6),
    # one PCIe Gen4 NVMe drive [NVMe]: 6.9 GB/s read, 4.1 GB/s write; 0.1 ms access (ASSUMED)
    "nvme_read": LinkSpec(6.9 * GB, 100e-6),
    "nvme_write": LinkSpec(4.1 * GB, 100e-6),
    # in-process memory store: one memcpy thread, ~10 GB/s (ASSUMED), 10 us per batch
    "memory_read": LinkSpec(10 * GB, 10e-6),
    "memory_write": LinkSpec(10 * GB, 10e-6),
}
_STORES_25G = {
    **_STORES_100G,
    # 25GbE: 3.125 GB/s line rate [ETH]; ~80% usable -> 2.5 GB/s (ASSUMED)
    "redis_read": LinkSpec(2.5 * GB, 200e-6),
    "redis_write": LinkSpec(2.5 * GB, 200e-6),
}

# Host link of one H100 SXM: PCIe Gen5 x16, 64 GB/s per direction [H100]; pinned-memory
# copies reach ~50 GB/s in practice (ASSUMED, ~80% of the line rate). 20 us per copy
# (launch + event; ASSUMED).
_PCIE5_PER_GPU = 50 * GB

# L3 of the TP=8 node. A TP rank stores and reads only its own KV shard (1/8 of each
# page: its KV head), so the store's bandwidth scales with TP exactly when every rank
# has its own path. On NVMe it does: the node has eight U.2 drives [DGX] and each rank's
# page files go to its own drive (or to the RAID 0 over all eight that DGX OS mounts
# as its cache volume), so the node reads 8 x 6.9 GB/s and writes 8 x 4.1 GB/s [NVMe]
# (ASSUMED: the PM9A3 figures stand in for the DGX's Gen4 U.2 drives). Over Redis it
# does not: every rank's TCP connection leaves through the node's one 100 GbE NIC
# [DGX], so the node keeps the 10 GB/s above.
_STORES_TP8 = {
    **_STORES_100G,
    "nvme_read": LinkSpec(8 * 6.9 * GB, 100e-6),
    "nvme_write": LinkSpec(8 * 4.1 * GB, 100e-6),
}

LLAMA3_70B_TP8 = Profile(
    name="llama3-70b-tp8-h100",
    description=(
        "Llama-3-70B-class GQA model, TP=8 on one 8x H100 SXM node, FP8 weights/GEMMs, "
        "BF16 KV cache; L3 over 100GbE (redis) or the node's eight Gen4 NVMe drives, "
        "one per TP rank"
    ),
    model=ModelCost(
        params=70.6e9,  # [L70]
        layers=80,  # [L70]
        attn_dim=64 * 128,  # 64 query heads x head_dim 128 [L70]
        kv_bytes_per_token=80
        * 2
        * 8
        * 128
        * 2,  # layers x (K,V) x 8 KV heads x 128 x 2 B = 327,680
        gpus=8,
        peak_flops=1979e12,  # dense FP8 per H100 SXM [H100]
        mfu=0.40,  # ASSUMED: below [FA3]'s 75% attention-only; TP=8 all-reduces and FP8 scaling
        prefill_overhead_s=0.015,  # ASSUMED: scheduling + kernel launches per prefill batch
        # ASSUMED 20 ms/token: weights alone are 70.6 GB / (8 x 3.35 TB/s) = 2.6 ms per step
        # [H100]; a loaded batch adds its KV reads and the prefills interleaved with decode.
        decode_s_per_token=0.020,
    ),
    links={
        # Each TP rank moves its 1/8 shard over its own x16 link; two GPUs share a PCIe
        # switch uplink on HGX H100 boards (ASSUMED), so the node moves 4 x 50 GB/s.
        "d2h": LinkSpec(4 * _PCIE5_PER_GPU, 20e-6),
        "h2d": LinkSpec(4 * _PCIE5_PER_GPU, 20e-6),
    },
    stores=_STORES_TP8,
)

LLAMA3_8B_H100 = Profile(
    name="llama3-8b-h100",
    description=(
        "Llama-3-8B-class GQA model on one H100 SXM, BF16 weights and KV; L3 over 25GbE "
        "(redis) or a local Gen4 NVMe"
    ),
    model=ModelCost(
        params=8.03e9,  # [L8]
        layers=32,  # [L8]
        attn_dim=32 * 128,  # 32 query heads x head_dim 128 [L8]
        kv_bytes_per_token=32 * 2 * 8 * 128 * 2,  # 32 x (K,V) x 8 KV heads x 128 x 2 B = 131,072
        gpus=1,
        peak_flops=989e12,  # dense BF16 [H100]
        mfu=0.55,  # ASSUMED: one GPU, no TP all-reduce; below [FA3]'s attention-only 75%
        prefill_overhead_s=0.010,  # ASSUMED
        # ASSUMED 12 ms/token: 16 GB of weights / 3.35 TB/s = 4.8 ms per step [H100], plus
        # the batch's KV reads and interleaved prefills.
        decode_s_per_token=0.012,
    ),
    links={
        "d2h": LinkSpec(_PCIE5_PER_GPU, 20e-6),  # one x16 Gen5 link, see above
        "h2d": LinkSpec(_PCIE5_PER_GPU, 20e-6),
    },
    stores=_STORES_25G,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (LLAMA3_70B_TP8, LLAMA3_8B_H100)}
DEFAULT_PROFILE = LLAMA3_70B_TP8.name


def get_profile(name: str) -> Profile:
    """The profile called ``name``; an unknown name raises, listing the valid ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown simulator profile {name!r}; allowed: {', '.join(sorted(PROFILES))}"
        ) from None
