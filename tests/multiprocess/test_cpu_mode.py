"""CPU mode and distributed bootstrap (megatron_sd3.testing.cpu_mode, megatron_sd3.distributed).

tests/_cpu_mode_worker.py trains the real SD3Model (tiny preset) through the production wiring
(megatron_sd3.training.build + training.step: megatron's schedules, DistributedDataParallel, optimizer,
finalize_model_grads): first as one process without torchrun (the reference), then with torchrun
(2 ranks, gloo, CPU) in several layouts compared with it (within the fp32 bound of tests/_bounds.py), each then saved and
loaded with dist_checkpointing and resumed for one more step.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _ranks import run_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "tests", "_cpu_mode_worker.py")

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode is for CPU hosts")


def _torchrun(workdir, *args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           WORKER, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=str(workdir), env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _no_torchrun_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """`python script.py` with no torchrun environment: the single-process reference (and its own
    checkpoint round trip)."""
    if torch.cuda.is_available():
        pytest.skip("CPU mode is for CPU hosts")
    workdir = tmp_path_factory.mktemp("cpu_mode_ref")
    proc = run_script(WORKER, ["--cases", "plain", "--save-reference", str(workdir / "ref.pt"), "--ckpt-dir",
                               str(workdir / "ckpt"), "--report-dir", str(workdir / "report")],
                      env=_no_torchrun_env(), cwd=str(workdir), timeout=200)
    path = workdir / "report" / "report_rank0.txt"
    return proc.returncode, proc.stdout + proc.stderr, path.read_text() if path.exists() else "", \
        workdir / "ref.pt"


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory, reference_run):
    """One torchrun launch (2 ranks) runs all layouts; each test checks its own case.

    One launch instead of six keeps the suite fast on 2 cores (imports dominate)."""
    rc, out, _, ref = reference_run
    assert rc == 0 and ref.exists(), out[-8000:]
    workdir = tmp_path_factory.mktemp("cpu_mode")
    rc, out = _torchrun(workdir, "--reference", str(ref),
                        "--cases", "pp2", "vpp2", "tp2", "dp2", "pp2_bf16", "dp2_bf16",
                        "--ckpt-dir", str(workdir / "ckpt"), "--report-dir",
                        str(workdir / "report"), timeout=600)
    lines = []
    for rank in (0, 1):
        path = workdir / "report" / f"report_rank{rank}.txt"
        lines += path.read_text().splitlines() if path.exists() else []
    return rc, out, lines


def _check_case(worker_run, case):
    rc, out, report = worker_run
    lines = [line for line in report if line.startswith(f"[{case}]")]
    ok = [line for line in lines if line.endswith("CASE_OK")]
    assert len(ok) == 2, f"case {case} did not pass on both ranks (rc={rc}):\n{out[-8000:]}"
    assert sum("steps match the single-process reference" in line for line in lines) == 2
    assert sum("checkpoint save/load round-trips" in line for line in lines) == 2
    assert sum("bit-identical to the uninterrupted run" in line for line in lines) == 2


# ----------------------------------------------------------------- multi-process, real paths
# The timeouts include the shared launch, which the first of these tests pays for.
@needs_no_cuda
@pytest.mark.timeout(900)
def test_pp2_1f1b_ddp_optimizer_and_checkpoint(worker_run):
    """PP=2 (uneven 3|1 layer split), 1F1B over 4 micro-batches, DDP, megatron optimizer with
    grad clipping, finalize_model_grads with per-token loss: losses and params equal the
    single-process reference; dist_checkpointing save/load/resume of model + optimizer."""
    _check_case(worker_run, "pp2")


@needs_no_cuda
@pytest.mark.timeout(900)
def test_vpp2_interleaved_schedule_and_checkpoint(worker_run):
    """PP=2 x VPP=2: the interleaved 1F1B schedule over two model chunks per rank (one DDP each,
    unbatched p2p as Megatron-LM does), checkpoint keys model0/model1, resume."""
    _check_case(worker_run, "vpp2")


@needs_no_cuda
@pytest.mark.timeout(900)
def test_tp2_training_rng_and_checkpoint(worker_run):
    """TP=2: column/row-parallel shards equal the reference's slices after training, each TP
    rank's tracker stream is seed + 2718 + tp_rank, save/load/resume round-trips."""
    _check_case(worker_run, "tp2")


@needs_no_cuda
@pytest.mark.timeout(900)
def test_dp2_distributed_optimizer_overlap_and_checkpoint(worker_run):
    """DP=2 with the distributed optimizer (reduce-scatter / all-gather on gloo) and
    overlap_grad_reduce; fully-parallel checkpoint save (Megatron-LM's default) with metadata
    distrib_optim_sharding_type=dp_reshardable, default load strategy."""
    _check_case(worker_run, "dp2")


@needs_no_cuda
@pytest.mark.timeout(900)
def test_bf16_float16_and_distributed_optimizer(worker_run):
    """bf16 params with fp32 main params: Float16OptimizerWithFloat16Params (PP=2) and the
    distributed optimizer (DP=2) run, track the fp32 reference (smoke tolerance) and resume
    bit-identically from a checkpoint."""
    _check_case(worker_run, "pp2_bf16")
    _check_case(worker_run, "dp2_bf16")
    rc, out, _ = worker_run
    assert rc == 0, out[-8000:]


@needs_no_cuda
@pytest.mark.timeout(240)
def test_single_process_without_torchrun(reference_run):
    """`python script.py` with no torchrun environment: a one-process gloo group on a free
    port, forward_backward_no_pipelining, DDP, optimizer, checkpoint save/load/resume."""
    rc, out, report, _ = reference_run
    assert rc == 0, out[-8000:]
    assert "[plain] rank 0: CASE_OK" in report, out[-8000:]
    assert "bit-identical to the uninterrupted run" in report


# ----------------------------------------------------------------- in-process unit tests
@pytest.mark.timeout(60)
def test_enable_cpu_mode_refuses_when_cuda_available(monkeypatch):
    from megatron_sd3.testing import cpu_mode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu_mode.enable_cpu_mode()


@needs_no_cuda
@pytest.mark.timeout(60)
def test_cpu_mode_patches_are_narrow_and_idempotent():
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    from megatron_sd3.testing import cpu_mode

    was_enabled = cpu_mode.is_cpu_mode_enabled()
    try:
        cpu_mode.enable_cpu_mode()
        n = len(cpu_mode._PATCHES)
        cpu_mode.enable_cpu_mode()  # idempotent
        assert len(cpu_mode._PATCHES) == n
        # Inside the patched modules "cuda" means the CPU ...
        assert schedules.torch is not torch
        t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
        assert t.device.type == "cpu"
        assert schedules.torch.cuda.current_device() == "cpu"
        assert schedules.torch.empty(2, device=schedules.torch.cuda.current_device()).device.type \
            == "cpu"
        # ... everything else is the real torch ...
        assert schedules.torch.distributed is torch.distributed
        assert schedules.torch.Tensor is torch.Tensor
        # ... and torch itself is untouched outside them.
        assert torch.zeros(1).type() == "torch.FloatTensor"
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")
        # CUDA type names only inside the wrapped megatron calls.
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.full((3,), 10.0)
        clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=float(p.grad.norm()))
        assert torch.allclose(p.grad.norm(), torch.tensor(1.0), atol=1e-5)
        assert p.type() == "torch.FloatTensor"
    finally:
        if not was_enabled:
            cpu_mode._disable_cpu_mode_for_tests()
    if not was_enabled:
        assert schedules.torch is torch


@needs_no_cuda
@pytest.mark.timeout(60)
def test_initialize_distributed_single_process_seeds_like_megatron():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_sd3.testing import cpu_mode
    from megatron_sd3.distributed import destroy_distributed, initialize_distributed

    was_enabled = cpu_mode.is_cpu_mode_enabled()
    destroy_distributed()  # a group left by an earlier test in this process; later ones re-create theirs
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        info = initialize_distributed(tp=1, pp=1, seed=42)
        assert (info.world_size, info.tp, info.pp, info.dp) == (1, 1, 1, 1)
        assert info.backend == "gloo" and info.cpu_mode and info.device.type == "cpu"
        assert parallel_state.model_parallel_is_initialized()
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(42)))
        with get_cuda_rng_tracker().fork():
            x = torch.rand(3)
        assert torch.equal(x, torch.rand(3, generator=torch.Generator().manual_seed(42 + 2718)))
    finally:
        destroy_distributed()
        os.environ.update(saved)
        if not was_enabled:
            cpu_mode._disable_cpu_mode_for_tests()
    assert not torch.distributed.is_initialized()
    assert not parallel_state.model_parallel_is_initialized()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(world_size=6, tp=4, pp=1), r"world size 6 is not divisible by TP x PP = 4 x 1"),
        (dict(tp=5, world_size=10), r"num_attention_heads 24 is not divisible by tensor-model-parallel-size 5"),
        (dict(world_size=4, tp=4, num_heads=8, hidden=1538), r"hidden_size 1538 is not divisible by .* 4"),
        (dict(pp=16, world_size=16), r"pipeline-model-parallel-size 16 > num_layers 15"),
        (dict(world_size=4, global_batch=6, micro_batch=1),
         r"global-batch-size 6 is not divisible by micro-batch-size x data-parallel size = 1 x 4"),
    ],
)
def test_check_layout_errors(kwargs, match):
    from megatron_sd3.training.parallel_layout import LayoutError, check_layout

    args = dict(world_size=2, tp=1, pp=1, num_layers=15, num_heads=24, hidden=1536,
                global_batch=8, micro_batch=2)
    args.update(kwargs)
    with pytest.raises(LayoutError, match=match) as err:
        check_layout(**args)
    assert "\n" not in str(err.value)


@pytest.mark.timeout(30)
def test_check_layout_ok_and_balanced_splits():
    from megatron_sd3.training.parallel_layout import balanced_stage_layers, check_layout, stage_layers

    # the origin's layout: 15 layers on 2 stages (uneven), TP 2, DP 2
    assert check_layout(8, 2, 2, 15, 24, 1536, 16, 2) == 2
    assert check_layout(1, 1, 1, 15, 24, 1536, 4, 4) == 1
    assert balanced_stage_layers(15, 2) == [8, 7]
    assert balanced_stage_layers(15, 4) == [4, 4, 4, 3]
    assert balanced_stage_layers(15, 15) == [1] * 15
    assert sum(balanced_stage_layers(15, 6)) == 15
    with pytest.raises(ValueError, match="equal middle stages"):
        stage_layers(15, 4, [3, 5, 4, 3])
    with pytest.raises(ValueError, match="sum to num_layers=15"):
        stage_layers(15, 2, [8, 8])
