"""What an H100 accepts, checked on CPU: the FP8 GEMM calls of one tiny training step (forward and
backward, bf16 parameters as a GPU run has them), captured and replayed through mmaemu, a bit-exact
emulator of ``torch._scaled_mm`` on an H100 PCIe (megatron_sd3/testing/h100_replay.py)."""
import pytest
import torch

from megatron_sd3.testing import h100_replay as R

FORMATS = ["hybrid", "e4m3"]


def _step_calls(fmt):
    """The ``torch._scaled_mm`` calls of one forward + backward of the tiny model in FP8 (tensorwise,
    every block GEMM), bf16 parameters and inputs, micro batch 2."""
    from megatron_sd3.backends import torchao as F
    from megatron_sd3.config import make_config
    from megatron_sd3.models.sd3_model import SD3Model
    from megatron_sd3.testing.helpers import tiny_forward_inputs

    cfg = make_config("tiny", zero_init_adaln=False,
                      parallel={"fp8": fmt, "bf16": True, "params_dtype": torch.bfloat16})
    model = SD3Model(cfg).to(torch.bfloat16)
    inputs = {k: v if k == "timestep" else v.to(torch.bfloat16)
              for k, v in tiny_forward_inputs(cfg, micro_batch=2).items()}
    with R.capture_scaled_mm() as calls, F.fp8_context(True, format=fmt):
        model(**inputs).float().pow(2).mean().backward()
    return calls


@pytest.fixture(scope="module", params=FORMATS)
def step_calls(request):
    from megatron_sd3.convert import ensure_single_process_parallel_state

    ensure_single_process_parallel_state()
    return request.param, _step_calls(request.param)


def test_every_fp8_gemm_of_a_step_is_one_an_h100_accepts(step_calls):
    """Forward, grad-input and grad-weight GEMMs of every FP8 linear of the 4 blocks -- qkv (both
    streams, and the image-only attention of the 2 dual-attention blocks), output projections,
    MLP in and out (the last block's text stream stops after its qkv at gamma 0) -- all accepted
    by cuBLASLt on an H100, layouts, alignment, formats and output dtype included. The check can refuse: the same
    call with its second operand row-major, as a layout slip would give it (torch's CPU kernel
    takes it), is refused."""
    fmt, calls = step_calls
    assert len(calls) == 3 * ((8 + 2) + (7 + 2) + 7 + 7)  # 3 GEMMs per linear: qkv, proj, fc1, fc2
    grads = {c.a.dtype for c in calls if not c.use_fast_accum}
    assert grads == ({torch.float8_e5m2} if fmt == "hybrid" else {torch.float8_e4m3fn})
    assert {c.out_dtype for c in calls} == {torch.bfloat16}
    refused = {c.signature: R.h100_refusal(c) for c in calls}
    assert not any(refused.values()), {k: v for k, v in refused.items() if v}
    slip = calls[0]
    slip = R.ScaledMmCall(slip.a, slip.b.contiguous(), slip.scale_a, slip.scale_b, slip.out_dtype,
                          slip.use_fast_accum, slip.out)
    assert "row-major and column-major" in R.h100_refusal(slip)


def test_the_cpu_kernel_lies_within_the_derived_bound_of_the_h100s_output(step_calls):
    """Every call's output on the CPU (what the CPU tests train with) against the H100's bits, at
    the bound derived from both kernels' arithmetic (h100_replay's docstring). The bound is not
    loose enough to hide a 2% error: the same outputs scaled by 1.02 break it."""
    _, calls = step_calls
    worst, worst_off = 0.0, 0.0
    for c in calls:
        h100 = R.h100_output(c)
        assert h100.dtype == c.out.dtype and h100.shape == c.out.shape
        worst = max(worst, ((h100.double() - c.out.double()).abs() / R.cpu_h100_bound(c, h100)).max().item())
        off = c.out.double() * 1.02
        worst_off = max(worst_off, ((h100.double() - off).abs() / R.cpu_h100_bound(c, h100, off)).max().item())
    assert worst <= 1.0, worst
    assert worst_off > 1.0, worst_off
