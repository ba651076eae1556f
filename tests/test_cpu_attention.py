"""The testbed's CPU extend attention (new queries only) against SGLang's own code."""

from __future__ import annotations

import pytest
import torch
from hiradix.integration.testbed import cpu_attention


def _batch(prefixes: list[int], news: list[int], heads: int, kv_heads: int, dim: int = 16):
    torch.manual_seed(0)
    totals = [p + n for p, n in zip(prefixes, news, strict=True)]
    pool = sum(totals) + 8
    k_cache = torch.randn(pool, kv_heads, dim)
    v_cache = torch.randn(pool, kv_heads, dim)
    req_to_token = torch.zeros(len(totals), max(totals), dtype=torch.int64)
    perm = torch.randperm(pool)  # KV of a request is scattered over the pool
    at = 0
    for i, t in enumerate(totals):
        req_to_token[i, :t] = perm[at : at + t]
        at += t
    query = torch.randn(sum(news), heads, dim)
    return {
        "query": query,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "req_to_token": req_to_token,
        "req_pool_indices": torch.arange(len(totals)),
        "seq_lens": torch.tensor(totals),
        "extend_prefix_lens": torch.tensor(prefixes),
        "extend_seq_lens": torch.tensor(news),
    }


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
def test_same_attention_as_sglang(causal: bool, heads: int, kv_heads: int) -> None:
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    original = TorchNativeAttnBackend._run_sdpa_forward_extend
    args = _batch([0, 37, 120, 5], [9, 1, 30, 64], heads, kv_heads)
    common = {"scaling": 0.25, "enable_gqa": heads != kv_heads, "causal": causal}
    q = args.pop("query")
    want = original(None, q, torch.zeros_like(q), *args.values(), **common)
    got = cpu_attention.extend_new_queries(
        original, None, q, torch.zeros_like(q), *args.values(), **common
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sliding_window_goes_to_sglang() -> None:
    calls = []

    def original(*args, **kwargs):
        calls.append(args)
        return args[2]

    args = _batch([3], [2], 2, 2)
    q = args.pop("query")
    out = torch.zeros_like(q)
    got = cpu_attention.extend_new_queries(
        original, None, q, out, *args.values(), causal=True, sliding_window_size=4
    )
    assert got is out and len(calls) == 1


def test_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_attention.ENV, raising=False)
    monkeypatch.setattr(cpu_attention, "_registered", False)
    cpu_attention.register()
    assert not cpu_attention._registered
    monkeypatch.setenv(cpu_attention.ENV, "everything")
    with pytest.raises(ValueError, match="new_queries"):
        cpu_attention.register()
