import os
import warnings

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Before any test module imports megatron-core: the package's import gives each
# ATEN_CPU_CAPABILITY a torch.compile cache of its own (megatron_sd3/compile_cache.py).
import megatron_sd3  # noqa: E402,F401
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")


@pytest.fixture
def single_process():
    """A one-process gloo group with megatron parallel_state (TP = PP = 1)."""
    from megatron_sd3.convert import ensure_single_process_parallel_state

    ensure_single_process_parallel_state()
    yield

import sys  # noqa: E402

_TESTS = os.path.dirname(os.path.abspath(__file__))
# tests/_ranks.py and the other helpers (workers, fixtures), and the groups' modules, which some
# tests share (tests/README.md)
sys.path.insert(0, _TESTS)
for _group in ("unit", "tools", "multiprocess", "launch"):
    sys.path.insert(1, os.path.join(_TESTS, _group))
