"""What the float64 runs of the layout-equivalence tests need beyond ``params_dtype=torch.float64``
(tests/_bounds.py; the workers _parallel_worker.py, _recompute_worker.py, _fp8_train_worker.py)."""
import torch


def float64_runs_megatron_fp32_paths():
    """megatron-core picks its fp32 code paths by type name ("torch.cuda.FloatTensor": the
    distributed optimizer's parameter groups, the gradient clipping's assert) and refuses other
    names; those paths are dtype-generic (views of the parameters, foreach kernels). In the float64
    runs a float64 tensor's type name reads as fp32's, so megatron runs its fp32 arithmetic, in
    float64. (testing/cpu_mode.py reports CPU tensors' names as CUDA's on top of this.)"""
    from megatron_sd3.testing import cpu_mode

    orig = cpu_mode._ORIG_TENSOR_TYPE

    def type_name(self, dtype=None, non_blocking=False, **kwargs):
        result = orig(self, dtype, non_blocking, **kwargs)
        if dtype is None and not kwargs and isinstance(result, str) and result.endswith(".DoubleTensor"):
            return result[:-len("DoubleTensor")] + "FloatTensor"
        return result

    cpu_mode._ORIG_TENSOR_TYPE = torch.Tensor.type = type_name


def scaled_mm_in_float64():
    """``torch._scaled_mm`` with ``out_dtype=torch.float64`` (what torchao asks for when the
    high-precision tensors are float64; torch's kernels give fp32 / bf16 only): the FP8 operands
    exactly in float64, their products exact, summed in float64, then scaled. Other calls go to
    torch's kernel. The float64 layout comparisons (tests/_bounds.py) run the FP8 cast, scaling and
    TP amax agreement of the real path; only the GEMM's accumulation is float64 instead of fp32."""
    orig = torch._scaled_mm

    def mm(a, b, scale_a=None, scale_b=None, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        if out_dtype != torch.float64:
            return orig(a, b, scale_a, scale_b, bias=bias, scale_result=scale_result, out_dtype=out_dtype,
                        use_fast_accum=use_fast_accum)
        assert scale_result is None
        out = (a.to(torch.float64) @ b.to(torch.float64)) * scale_a.to(torch.float64) * scale_b.to(torch.float64)
        return out if bias is None else out + bias.to(torch.float64)

    torch._scaled_mm = mm
