"""torch.compile's on-disk cache, a folder per ``ATEN_CPU_CAPABILITY``.

Inductor's cache (``/tmp/torchinductor_$USER``) is not keyed on that variable: on an AVX-512 CPU,
CPU kernels cached by a run at the default capability and loaded by a run under
``ATEN_CPU_CAPABILITY=avx2`` with one thread gave non-finite outputs (torch 2.13; a fresh cache
gives the right numbers under either). With the variable set and no ``TORCHINDUCTOR_CACHE_DIR``
of the user's, the cache becomes ``/tmp/torchinductor_$USER_<capability>``; child processes
inherit it. It must happen before anything touches inductor's folder (megatron-core's import did,
before its fused kernels compiled at first call: lazy_compile.py), so the package's ``__init__``
calls :func:`use_a_cache_per_cpu_capability` first.
"""
from __future__ import annotations

import os


def use_a_cache_per_cpu_capability() -> None:
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if not capability or os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_{capability}"
