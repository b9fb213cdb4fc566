"""tools/fp8_cast_kernels.py: the FP8 cast kernels of a compiled joint block, counted on CPU."""
import os
import sys

import pytest

from _ranks import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import fp8_cast_kernels as K  # noqa: E402


def test_kernel_names_split_into_their_ops_and_classify():
    """Inductor names a fused kernel after its ops; ops with underscores of their own stay whole."""
    assert K.ops_of("cpp_fused__scaled_mm__to_copy_abs_add_clamp_max_mul_native_layer_norm_reciprocal_t_view_1") == [
        "_scaled_mm", "_to_copy", "abs", "add", "clamp", "max", "mul", "native_layer_norm", "reciprocal", "t", "view"]
    code = "\n".join([
        "cpp_fused__to_copy_abs_clamp_max_mul_reciprocal_t_view_2 = async_compile.cpp_pybinding(['const float*', "
        "'float*', 'at::Float8_e4m3fn*'], r'''",
        "cpp_fused__to_copy_abs_add_clamp_max_mul_native_layer_norm_reciprocal_3 = async_compile.cpp_pybinding("
        "['const float*', 'at::Float8_e4m3fn*'], r'''",
        "cpp_fused__to_copy_clamp_mul_reciprocal_4 = async_compile.cpp_pybinding(['float*'], r'''",
        "cpp_fused_gelu_5 = async_compile.cpp_pybinding(['const float*', 'float*'], r'''",
        "    extern_kernels._scaled_mm(buf1, buf2, buf3, buf4, out_dtype=torch.float32)",
        "                            auto tmp1 = tmp0.abs();",
        "                            tmp_acc0_vec_local = at::vec::maximum(tmp_acc0_vec_local, tmp1);",
    ])
    got = K.classify([code])
    assert (got["kernels"], got["fp8_writing"], got["cast_only"], got["scale_only"], got["scaled_mm"]) == (4, 2, 1, 1, 1)
    assert got["cast_only_kernels"] == ["cpp_fused__to_copy_abs_clamp_max_mul_reciprocal_t_view_2"]
    assert got["amax_reductions"] == [1] and got["amax_kernels"] == 2


@pytest.mark.slow  # inductor's C++ build of a block's kernels: ~100 s on a cold cache
@pytest.mark.timeout(400)
def test_a_compiled_block_writes_its_activations_and_gradients_in_fp8_where_it_computes_them():
    """One compiled joint block (forward + backward, FP8 hybrid) as a training step runs it:
    every activation and gradient cast is fused into the kernel that computes the operand (norm +
    modulate, GELU, attention output, the backward's gradient ops); at most 3 kernels do nothing
    but cast, against 20 with a compiled region per FP8 GEMM (tools/fp8_cast_kernels.py --regions
    gemm, README); and the forward reduces no weight's amax (the step computed the weights'
    scales before the block): at most one amax per FP8 GEMM's activation, 17 with the scales
    computed per GEMM."""
    got = K.count("block", "hybrid", weight_scales="step")
    assert got["modules"] == 2  # one graph forward, one backward
    assert got["scaled_mm"] == 30  # 10 FP8 linears x (forward, grad input, grad weight)
    assert got["cast_only"] <= 3, got["cast_only_kernels"]
    assert got["fp8_writing"] - got["cast_only"] >= 13, got["fp8_kernels"]
    assert got["amax_reductions"][0] <= 10, got["amax_reductions"]  # 10 FP8 GEMMs' activations
