"""The model identity SGLang's build context gives (integration/sglang/factory.py), over
SGLang's real KV pools: what changes KV bytes changes the identity."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hiradix.integration.sglang.factory import model_identity
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool


def ctx_for(model_dir, *, kv_dtype=torch.float32, kv_cache_dtype="auto", page_size=1, **args):
    from transformers import AutoConfig

    kv = MHATokenToKVPool(
        64, page_size=page_size, dtype=kv_dtype, head_num=2, head_dim=16, layer_num=2,
        device="cpu", enable_memory_saver=False,
    )  # fmt: skip
    allocator = TokenToKVPoolAllocator(64, kv_dtype, "cpu", kv, need_sort=False)
    params = CacheInitParams(
        disable=False,
        req_to_token_pool=ReqToTokenPool(4, 256, "cpu", enable_memory_saver=False),
        token_to_kv_pool_allocator=allocator,
        page_size=page_size,
    )
    server_args = SimpleNamespace(
        model_path=str(model_dir),
        load_format="auto",
        weight_version="default",
        kv_cache_dtype=kv_cache_dtype,
        quantization=None,
        quantization_param_path=None,
        attention_backend="torch_native",
        prefill_attention_backend=None,
        decode_attention_backend=None,
        revision=None,
        download_dir=None,
    )
    for key, value in args.items():
        setattr(server_args, key, value)
    model_config = SimpleNamespace(
        hf_config=AutoConfig.from_pretrained(model_dir),
        model_path=str(model_dir),
        dtype=torch.float32,
        quantization=None,
        revision=None,
    )
    return SimpleNamespace(
        server_args=server_args, model_config=model_config, params=params, tp_rank=0, tp_size=1
    )


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    from hiradix.integration.testbed.model_builder import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny1", preset="tiny", seed=1)


def test_other_weights_same_config_other_identity(tiny_model, other_model):
    a, b = model_identity(ctx_for(tiny_model)), model_identity(ctx_for(other_model))
    assert a.config == b.config and a.architecture == b.architecture
    assert a.weights != b.weights and a.weights.startswith("files:")
    assert a.key() != b.key()
    assert model_identity(ctx_for(tiny_model)).key() == a.key()  # a restart: the same


def test_kv_dtypes_differ(tiny_model):
    keys = {
        model_identity(ctx_for(tiny_model)).key(),
        model_identity(
            ctx_for(tiny_model, kv_dtype=torch.float8_e4m3fn, kv_cache_dtype="fp8_e4m3")
        ).key(),
        model_identity(
            ctx_for(tiny_model, kv_dtype=torch.float8_e5m2, kv_cache_dtype="fp8_e5m2")
        ).key(),
        model_identity(ctx_for(tiny_model, kv_dtype=torch.bfloat16, kv_cache_dtype="bf16")).key(),
    }
    assert len(keys) == 4
    e4m3 = model_identity(
        ctx_for(tiny_model, kv_dtype=torch.float8_e4m3fn, kv_cache_dtype="fp8_e4m3")
    )
    assert e4m3.kv == "fp8_e4m3/float8_e4m3fn/store=uint8"  # both fp8 kinds store uint8


def test_weight_version_page_size_quantization_and_backend_are_in_the_identity(tiny_model):
    base = model_identity(ctx_for(tiny_model)).key()
    others = [
        ctx_for(tiny_model, weight_version="step-7"),
        ctx_for(tiny_model, page_size=16),
        ctx_for(tiny_model, quantization="fp8"),
        ctx_for(tiny_model, attention_backend="triton"),
        ctx_for(tiny_model, load_format="dummy"),
    ]
    keys = [model_identity(c).key() for c in others]
    assert base not in keys and len(set(keys)) == len(keys)


def test_weights_from_elsewhere_get_a_nonce(tiny_model):
    a = model_identity(ctx_for(tiny_model, load_format="remote_instance"))
    b = model_identity(ctx_for(tiny_model, load_format="remote_instance"))
    assert a.weights.startswith("nonce:") and a.key() != b.key()
