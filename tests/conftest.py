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


# The files that take longest on 2 cores go to the pytest-xdist workers first (longest first keeps
# one worker from starting `make demo` when the other is nearly done; docs/results/
# make_test_durations.txt has the times). Within a file the order stays as written.
LONGEST_FIRST = ("multiprocess/test_conditional.py", "launch/test_faults.py", "launch/test_launch.py",
                 "multiprocess/test_checkpoint_crash.py", "multiprocess/test_checkpoint_no_orphans.py",
                 "multiprocess/test_checkpoint_disk_full.py", "multiprocess/test_cpu_mode.py",
                 "launch/test_slurm_two_node.py", "tools/test_install.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return next((i for i, f in enumerate(LONGEST_FIRST) if path.endswith(f)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order
