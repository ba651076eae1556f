"""A pipeline stage in a child process (``test_pp_agreement``): relays vectors over gloo
with :func:`relay_down`. Kept apart from the test module so that a spawned child imports
torch and the relay only, not SGLang."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hiradix.integration.sglang.agreed_step import relay_down


def relay_stage(rank: int, world: int, init: str, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no hostname lookup
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    group = torch.distributed.group.WORLD
    sends: list = []
    got = []
    for step in range(5):
        mine = [rank * 1000 + step, -rank, 7]  # only the first stage's values may survive
        got.append(relay_down(mine, group, rank, world, sends))
    for work in sends:
        work.wait()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    Path(out, f"{rank}.txt").write_text(repr(got))
