"""Testbed only: serve a tiny MLA model (DeepSeek-V3 architecture) on this CPU.

SGLang 0.5.23 picks DeepSeek's attention forward method per backend
(``models/deepseek_common/attention_backend_handler.py``); ``torch_native`` has no handler
of its own and gets Triton's, which runs a prefill without a cached prefix as plain MHA
(K and V expanded from the latent by ``kv_b_proj``). ``TorchNativeAttnBackend`` then reads
keys from the pool, which for MLA holds the latent (``kv_lora_rank + qk_rope_head_dim``
wide), and fails (``Expected size ... [4, 48] but got: [4, 80]``); SGLang's own CPU MLA
path needs Intel AMX and ``sgl_kernel`` CPU ops. With ``HIRADIX_CPU_MLA=absorbed`` this
module registers a ``torch_native`` handler that always takes the absorbed MLA method
(queries projected into the latent space, attention over the latent cache, as decode and
every prefill with a cached prefix already do), which ``TorchNativeAttnBackend`` computes
with its generic SDPA code: the same attention, up to floating-point summation order.

Reaches only servers started by :mod:`.sglang_server` (the testbed's entry point
``hiradix_cpu_mla``), and does nothing without the environment variable.
:func:`build_tiny_mla_model` writes the random model such servers load.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hiradix.integration.testbed import env_switch

logger = logging.getLogger(__name__)

ENV = "HIRADIX_CPU_MLA"
MODE = "absorbed"
STAMP_FILE = "hiradix_mla_model.json"
BUILDER_VERSION = 1

_registered = False


def register() -> None:
    """Entry point (every process of a testbed server): register the handler if asked."""
    global _registered
    if _registered or not env_switch(ENV, MODE):
        return
    from sglang.srt.models.deepseek_common import attention_backend_handler as handlers

    def absorbed(attn: Any, forward_batch: Any) -> Any:
        return handlers._dispatch_mla_subtype(attn, forward_batch)

    handlers.AttentionBackendRegistry.register("torch_native", absorbed)
    _registered = True
    logger.info("hiradix testbed: torch_native runs DeepSeek attention as absorbed MLA")


def build_tiny_mla_model(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """A random float32 ``DeepseekV3ForCausalLM`` (2 dense layers, hidden 128, 4 heads,
    kv_lora_rank 64, rope 16: an 80-wide latent, 640 bytes of KV per token) with a locally
    trained tokenizer. Idempotent: a directory with the same stamp is reused."""
    import torch
    from hiradix.integration.testbed.model_builder import _write_tokenizer
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    out = Path(out_dir)
    stamp = {"seed": seed, "version": BUILDER_VERSION}
    stamp_path = out / STAMP_FILE
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _write_tokenizer(out, 512, seed)
    config = DeepseekV3Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=2,  # every layer dense: no MoE kernels on CPU
        kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=32, max_position_embeddings=4096, rope_scaling=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    DeepseekV3ForCausalLM(config).to(torch.float32).save_pretrained(out, safe_serialization=True)
    # SGLang reads DeepSeek's own config keys: its yarn rope type and the MoE layer period
    config_path = out / "config.json"
    data = json.loads(config_path.read_text())
    data["architectures"] = ["DeepseekV3ForCausalLM"]
    data["torch_dtype"] = data["dtype"] = "float32"
    data["moe_layer_freq"] = 1
    data["rope_scaling"] = {
        "type": "deepseek_yarn", "rope_type": "deepseek_yarn", "factor": 1.0,
        "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0,
    }  # fmt: skip
    config_path.write_text(json.dumps(data, indent=1))
    stamp_path.write_text(json.dumps(stamp))
    return out
