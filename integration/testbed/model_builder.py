"""Tiny, randomly initialised Llama models for CPU end-to-end runs of real SGLang.

No hub access is needed or used: the weights are random (seeded) and the tokenizer is
trained locally with the ``tokenizers`` library on generated text. The output
directory is an ordinary Hugging Face model directory (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) that
``python -m sglang.launch_server --model-path`` and ``AutoTokenizer`` load.

This module imports torch, transformers and tokenizers, never sglang.

Presets (see ``PRESETS``; shapes are Llama, rope theta 10000, SiLU MLP):

========  ======  ======  =====  ========  ========  =====  ========  ==============
preset    hidden  layers  heads  kv heads  head dim  vocab  dtype     KV bytes/token
========  ======  ======  =====  ========  ========  =====  ========  ==============
tiny      64      2       4      2         16        1024   float32   512
bench     768     4       4      4         64        4096   bfloat16  4096
========  ======  ======  =====  ========  ========  =====  ========  ==============

``tiny`` (0.2 M parameters) starts fast and gives deterministic greedy outputs (float32
end to end). ``bench`` is sized so that a 4096-token prefill takes about one second on
the project's 2-core CPU machine (sglang 0.5.23, ``torch_native`` attention, bfloat16
on an AMX-capable Xeon), with 4 attention heads of 64 (q width 256 < hidden 768) and an
MLP of 4096: attention is about 13% of the FLOPs of a 6K-token prefill, as in a
production model (Llama-3-8B: about 10%), so the cost of a prompt follows its uncached
tokens the way it does on a GPU. (The first version had 12 heads and an MLP of 2048:
attention was over 40% of a 6K prefill, and a 75%-cached prompt still cost half of a
cold one.)

The checkpoint dtype is the intended serving dtype: ``SGLangServer`` passes it as
``--dtype`` because sglang's ``--dtype auto`` downcasts a float32 checkpoint to float16.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Bump when the files written change, so that stale cached model dirs are rebuilt.
BUILDER_VERSION = 1
STAMP_FILE = "hiradix_model_stamp.json"

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

# A minimal chat template: enough for /v1/chat/completions and apply_chat_template.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} {{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@dataclass(frozen=True, slots=True)
class ModelPreset:
    """Shape of one preset. ``dtype`` is the checkpoint and serving dtype."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 8192
    dtype: str = "float32"
    attention_head_dim: int = 0  # 0: hidden_size // num_heads

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads


PRESETS: dict[str, ModelPreset] = {
    # About 0.2 M parameters: starts in seconds, used by tests and `make demo`.
    "tiny": ModelPreset(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, vocab_size=1024,
    ),
    # About 45 M parameters in bfloat16 (AMX on this CPU makes bf16 ~2.5x faster than
    # float32 here): a 4096-token prefill takes about 1 s on 2 CPU cores. Few, narrow
    # attention heads and a wide MLP give it the FLOP mix of a production model:
    # attention is ~13% of a 6K-token prefill (Llama-3-8B: ~10%), so the cost of a
    # prompt follows its uncached tokens, as on a GPU.
    "bench": ModelPreset(
        hidden_size=768, num_layers=4, num_heads=4, num_kv_heads=4,
        intermediate_size=4096, vocab_size=4096, dtype="bfloat16", attention_head_dim=64,
    ),
}  # fmt: skip


def get_preset(preset: str) -> ModelPreset:
    """Return the named preset; raise ``ValueError`` listing the valid names."""
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown model preset {preset!r}; valid: {sorted(PRESETS)}") from None


def kv_bytes_per_token(preset: str) -> int:
    """Bytes of K and V that one token occupies over all layers, in the serving dtype."""
    shape = get_preset(preset)
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * DTYPE_BYTES[shape.dtype]


def build_tiny_model(
    out_dir: str | os.PathLike[str], *, preset: str = "tiny", seed: int = 0
) -> Path:
    """Write a random ``LlamaForCausalLM`` and a locally trained tokenizer to ``out_dir``.

    Idempotent: if ``out_dir`` holds a stamp with the same preset, seed and builder
    version, nothing is rewritten. Returns ``out_dir`` as a ``Path``.
    Deterministic: the same preset and seed give byte-identical weights.
    """
    shape = get_preset(preset)
    out = Path(out_dir)
    stamp = {"preset": preset, "seed": seed, "version": BUILDER_VERSION, "shape": asdict(shape)}
    stamp_path = out / STAMP_FILE
    if stamp_path.exists():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return out
        except (OSError, ValueError):
            pass  # unreadable stamp: rebuild
        stamp_path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    _write_tokenizer(out, shape.vocab_size, seed)
    _write_model(out, shape, seed)
    # The stamp goes last: a build interrupted half-way is redone next time.
    stamp_path.write_text(json.dumps(stamp, indent=1, sort_keys=True))
    logger.info("built %s model (seed %d) in %s", preset, seed, out)
    return out


def _write_model(out: Path, shape: ModelPreset, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
    )
    torch.manual_seed(seed)
    # Default init std 0.02 makes logits nearly flat; a larger std gives clearly
    # separated logits, so greedy argmax is stable against reduction-order noise.
    config.initializer_range = 0.2
    model = LlamaForCausalLM(config).to(getattr(torch, shape.dtype))
    model.eval()
    model.save_pretrained(out, safe_serialization=True)


def _write_tokenizer(out: Path, vocab_size: int, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=8192,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _training_text(seed: int, lines: int = 4000) -> Iterator[str]:
    """Pseudo-English lines built from random syllables: enough to fill a small BPE vocab."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    for _ in range(lines):
        yield " ".join(rng.choices(words, k=rng.randint(5, 20))) + "."
