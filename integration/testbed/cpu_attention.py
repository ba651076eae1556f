"""Testbed only: CPU extend attention that computes the new tokens' queries only.

SGLang 0.5.23's ``torch_native`` backend (the one a CPU server runs) pads every extend
query to the whole sequence and runs causal attention over ``seq_len x seq_len``, then
keeps the rows of the new tokens: a prompt whose first 95% is cached still costs about
half of a cold prefill (``bench_multiturn --calibrate`` measures it). GPU backends
(FlashInfer, FA3, Triton) compute only the ``new x seq_len`` block, which is why prefix
caching pays on a GPU. Benchmarks that want CPU TTFTs to react to caching the way GPU
TTFTs do start *every* server they compare, SGLang's own cache included, with
``HIRADIX_CPU_EXTEND_ATTENTION=new_queries``; this module then wraps
``TorchNativeAttnBackend._run_sdpa_forward_extend`` (an AROUND hook, so anything it does
not handle, such as sliding windows and encoder-decoder attention, goes to SGLang's
code). Rows are independent in softmax attention, so the result is the same attention,
up to floating-point summation order.

The testbed's entry point ``hiradix_cpu_attention`` registers it, in servers started by
:mod:`.sglang_server` only (an installed hiradix declares no such entry point); without
the environment variable it does nothing, and ``--enable-hiradix`` never depends on it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from hiradix.integration.testbed import env_switch
from torch.nn.functional import scaled_dot_product_attention

logger = logging.getLogger(__name__)

ENV = "HIRADIX_CPU_EXTEND_ATTENTION"
MODE = "new_queries"
TARGET = (
    "sglang.srt.layers.attention.torch_native_backend."
    "TorchNativeAttnBackend._run_sdpa_forward_extend"
)

_registered = False


def register() -> None:
    """Entry point (every process of a testbed server): install the hook if the variable asks."""
    global _registered
    if _registered or not env_switch(ENV, MODE):
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, extend_new_queries, HookType.AROUND)
    _registered = True
    logger.info("hiradix testbed: CPU extend attention computes new queries only (pid %d)",
                os.getpid())  # fmt: skip


def extend_new_queries(
    original: Callable[..., torch.Tensor],
    backend: Any,
    query: torch.Tensor,
    output: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_prefix_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    encoder_lens: torch.Tensor | None = None,
    scaling: float | None = None,
    enable_gqa: bool = False,
    causal: bool = False,
    is_cross_attn: bool = False,
    sliding_window_size: int | None = None,
) -> torch.Tensor:
    """Same contract as SGLang's ``_run_sdpa_forward_extend`` (shapes in its docstring)."""
    if (
        encoder_lens is not None
        or is_cross_attn
        or (sliding_window_size is not None and sliding_window_size > -1)
    ):
        return original(
            backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
            seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens, scaling,
            enable_gqa, causal, is_cross_attn, sliding_window_size,
        )  # fmt: skip
    heads_first = query.movedim(0, query.dim() - 2)  # [heads, tokens, dim]
    start = 0
    for i in range(seq_lens.shape[0]):
        new = int(extend_seq_lens[i])
        prefix = int(extend_prefix_lens[i])
        total = int(seq_lens[i])
        end = start + new
        tokens = req_to_token[req_pool_indices[i], :total]
        q = heads_first[:, start:end, :]
        k = k_cache[tokens].movedim(0, query.dim() - 2)
        v = v_cache[tokens].movedim(0, query.dim() - 2)
        if not (q.dtype == k.dtype == v.dtype):
            k, v = k.to(q.dtype), v.to(q.dtype)
        mask = None
        if causal and prefix > 0:  # new token j sees every cached token and new tokens <= j
            mask = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(prefix)
        out = scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
            is_causal=causal and mask is None, scale=scaling, enable_gqa=enable_gqa,
        )  # fmt: skip
        output[start:end] = out.squeeze(0).movedim(query.dim() - 2, 0)
        start = end
    return output
