"""Import-only stand-in for ``sgl_kernel`` on CPU SGLang runs (see ../../README.md).

With ``SGLANG_USE_CPU_ENGINE=1`` sglang does ``from sgl_kernel import <op>`` at import
time (e.g. ``copy_all_layer_kv_cache_cpu`` in kernels/ops/kvcache/cache_move.py), but on
a CPU run without sgl_kernel's torch ops registered it uses ``torch_native`` attention
and native layers and never calls them. Every attribute therefore imports fine and
raises a clear error if called: a call means something silently depended on it.

Registers no ``torch.ops.sgl_kernel`` ops, so sglang's AMX check
(``hasattr(torch.ops.sgl_kernel, "convert_weight_packed")``) stays False.
"""

__version__ = "0.0.0+cpu_standin"


def _unavailable(name):
    def _raise(*args, **kwargs):
        raise RuntimeError(
            f"sgl_kernel stand-in: {name} called on a CPU run; this code path needs "
            "a real sgl_kernel build (it is not expected on CPU with torch_native attention)"
        )

    _raise.__name__ = name
    _raise.__qualname__ = f"sgl_kernel.{name}"
    return _raise


def __getattr__(name):
    # Dunder look-ups (__path__ probes, __wrapped__, ...) must stay AttributeError so that
    # importlib, inspect and hasattr() behave as for an ordinary module.
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(name)
