"""Shared pytest setup. Fixtures that start real processes live next to the tests that use them."""

from __future__ import annotations

import os

# CPU tests must never take SGLang's CUDA code paths, even on a GPU host (see
# SGLANG-0.5.23.md section 6: the kernel flags are process-global).
if os.environ.get("HIRADIX_GPU_TESTS") != "1":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
