"""The CUDA twin of the KV copier, with plain torch on a GPU (``pytest -m gpu``).

Run on a GPU machine with ``HIRADIX_GPU_TESTS=1 pytest -m gpu tests/test_gpu_copy.py``;
skipped elsewhere (conftest.py hides CUDA from CPU test runs)."""

from __future__ import annotations

import pytest
import torch
from hiradix.backends.host_slab import HostSlab

from hiradix.kv_copy import CpuKvCopier, CudaKvCopier, LayerEvents, make_copier
from hiradix.transfer import TransferEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LAYERS, SLOTS, HEADS, DIM = 4, 4096, 8, 128


def make_pool(dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = [
        torch.randn(SLOTS, HEADS, DIM, device="cuda", dtype=dtype, generator=gen)
        for _ in range(LAYERS)
    ]
    v = [
        torch.randn(SLOTS, HEADS, DIM, device="cuda", dtype=dtype, generator=gen)
        for _ in range(LAYERS)
    ]
    slab = HostSlab(
        2048, layers=LAYERS, heads=HEADS, head_dim=DIM, dtype=dtype, page_size=16, pin_memory=True
    )
    return k, v, slab


def test_make_copier_picks_the_cuda_twin():
    k, v, slab = make_pool()
    assert isinstance(make_copier(k, v, slab), CudaKvCopier)
    assert isinstance(make_copier([t.cpu() for t in k], [t.cpu() for t in v], slab), CpuKvCopier)
    assert slab.k.is_pinned()


def test_round_trip_device_host_device():
    k, v, slab = make_pool()
    copier = CudaKvCopier(k, v, slab)
    perm = torch.randperm(SLOTS, device="cuda")
    device_idx, target = perm[:512], perm[512:1024]  # disjoint source and destination
    want_k = [t[device_idx].clone() for t in k]
    host_idx = slab.alloc(512)
    handle = copier.device_to_host(device_idx, host_idx)
    handle.wait()
    assert handle.done()
    for layer in range(LAYERS):
        assert torch.equal(slab.k[layer][host_idx], k[layer][device_idx].cpu())
        assert torch.equal(slab.v[layer][host_idx], v[layer][device_idx].cpu())
    # load back into other device slots, layer by layer
    events = copier.host_to_device(host_idx, target)
    assert isinstance(events, LayerEvents) and len(events.events) == LAYERS
    for layer in range(LAYERS):
        events.wait_until(layer)  # the current stream waits for this layer only
        assert torch.equal(k[layer][target], want_k[layer])
        assert torch.equal(v[layer][target], v[layer][device_idx])
    torch.cuda.synchronize()
    assert events.done()


def test_device_to_host_is_ordered_after_the_forward_stream():
    """A kernel still writing KV on the forward stream must finish before the copy reads."""
    k, v, slab = make_pool()
    forward = torch.cuda.Stream()
    copier = CudaKvCopier(k, v, slab, forward_stream=forward)
    device_idx = torch.arange(256, device="cuda")
    host_idx = slab.alloc(256)
    with torch.cuda.stream(forward):
        torch.cuda._sleep(50_000_000)  # a long-running 'forward pass'
        for layer in range(LAYERS):
            k[layer][:256].fill_(7.0)
            v[layer][:256].fill_(-3.0)
    handle = copier.device_to_host(device_idx, host_idx)
    engine = TransferEngine(copier)
    done = []
    engine._copies.append((handle, done.append))
    while not done:
        engine.poll()
    assert done == [True]
    assert bool((slab.k[:, host_idx] == 7.0).all()) and bool((slab.v[:, host_idx] == -3.0).all())


def test_copies_wait_for_indices_made_on_the_callers_stream():
    """Issue 16 item 1: under SGLang's overlap scheduler the index tensors come from its
    schedule stream, not the forward stream; the copy must wait for them, and their memory
    must not be reused while the copy reads them."""
    k, v, slab = make_pool()
    forward = torch.cuda.Stream()
    schedule = torch.cuda.Stream()
    copier = CudaKvCopier(k, v, slab, forward_stream=forward)
    host_idx = slab.alloc(256)
    expected_k = torch.stack([layer[512:768] for layer in k]).cpu()
    with torch.cuda.stream(schedule):
        torch.cuda._sleep(50_000_000)  # the schedule stream is still busy...
        device_idx = torch.arange(256, device="cuda") + 512  # ...making the indices
        handle = copier.device_to_host(device_idx, host_idx)
        del device_idx  # its memory goes back to the allocator at once
        torch.empty(256, dtype=torch.int64, device="cuda").fill_(0)  # and may be reused
    handle.wait()
    assert torch.equal(slab.k[:, host_idx], expected_k)


def test_host_to_device_waits_for_readers_on_the_forward_stream():
    """Slots being loaded into may still be read by a kernel on the forward stream."""
    k, v, slab = make_pool(torch.float32)
    forward = torch.cuda.Stream()
    copier = CudaKvCopier(k, v, slab, forward_stream=forward)
    host_idx = slab.alloc(128)
    slab.k[:, host_idx] = 5.0
    slab.v[:, host_idx] = 6.0
    target = torch.arange(128, device="cuda")
    seen = torch.empty(128, HEADS, DIM, device="cuda")
    with torch.cuda.stream(forward):
        torch.cuda._sleep(50_000_000)
        seen.copy_(k[0][target])  # reads the old values
    expected_old = k[0][target].clone()
    torch.cuda.current_stream().wait_stream(forward)  # keep the expectation honest
    events = copier.host_to_device(host_idx, target)
    events.wait()
    torch.cuda.synchronize()
    assert torch.equal(seen, expected_old)
    assert bool((k[0][target] == 5.0).all()) and bool((v[LAYERS - 1][target] == 6.0).all())


def test_scattered_host_slots_take_the_staging_path():
    k, v, slab = make_pool()
    copier = CudaKvCopier(k, v, slab)
    host_idx = torch.arange(0, 1024, 2)  # every other slot: not one run
    device_idx = torch.arange(0, 512, device="cuda")
    want = k[3][device_idx].clone()
    copier.device_to_host(device_idx, host_idx).wait()
    assert torch.equal(slab.k[2][host_idx], k[2][device_idx].cpu())
    target = torch.arange(SLOTS - 512, SLOTS, device="cuda")  # disjoint from the source
    copier.host_to_device(host_idx, target).wait()
    assert torch.equal(k[3][target], want)


def test_layer_gate_lets_attention_wait_for_its_own_layer_only():
    """Registered on SGLang's KV pool, the gate makes the forward stream wait, per layer,
    for the loads still in flight."""
    from hiradix.kv_copy import LayerLoadGate

    k, v, slab = make_pool(torch.float32)
    copier = CudaKvCopier(k, v, slab)
    host_idx = slab.alloc(256)
    for layer in range(LAYERS):
        slab.k[layer][host_idx] = float(layer + 1)
    target = torch.arange(256, device="cuda")
    gate = LayerLoadGate()
    gate.add(copier.host_to_device(host_idx, target))
    forward = torch.cuda.Stream()
    sums = []
    with torch.cuda.stream(forward):
        for layer in range(LAYERS):  # what attention does: wait, then read the layer
            gate.wait_until(layer)
            sums.append(k[layer][target].sum())
    torch.cuda.synchronize()
    per_layer = 256 * HEADS * DIM
    assert [float(x) for x in sums] == [float((layer + 1) * per_layer) for layer in range(LAYERS)]
    torch.cuda.synchronize()
    gate.add(copier.host_to_device(host_idx, target))
    assert gate.pending == 1  # the finished load was dropped when this one came
