"""The FP8 backends (megatron_sd3/backends/), their registry and FP8 context policy, and the FLOP
count (megatron_sd3/flops.py).

The FP8 layers are megatron-core's tensor-parallel linears with their local GEMM run by torchao's
float8 matmul. On CPU ``torch._scaled_mm`` has a kernel (torch 2.13), so everything here is real
FP8 arithmetic, not an emulation.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _fp8_helpers as H  # noqa: E402

pytest.importorskip("torchao")

from megatron_sd3 import backends  # noqa: E402
from megatron_sd3.backends import Fp8Settings, check_backend  # noqa: E402
from megatron_sd3.backends import torchao as F  # noqa: E402
from megatron_sd3.backends import transformer_engine as TE  # noqa: E402
from megatron_sd3.backends.torchao import (  # noqa: E402
    Float8ColumnParallelLinear,
    Float8RowParallelLinear,
    fp8_context,
)
from _ranks import free_port  # noqa: E402
from megatron_sd3.testing.helpers import build_fp8_pair, parallel_linear_config, rel  # noqa: E402


@pytest.fixture
def tp1(single_process):
    """A 1-process gloo group with megatron parallel_state at TP=1."""
    yield


@contextlib.contextmanager
def count_scaled_mm(scales=None):
    """Count torch._scaled_mm calls (what torchao's Float8TrainingTensor mm dispatches to);
    ``scales``, a list, gets each call's ``(scale_a.numel(), scale_b.numel())``."""
    calls = []
    orig = torch._scaled_mm

    def wrapped(a, b, scale_a, scale_b, *args, **kwargs):
        calls.append((a.dtype, b.dtype))
        if scales is not None:
            scales.append((scale_a.numel(), scale_b.numel()))
        return orig(a, b, scale_a, scale_b, *args, **kwargs)

    torch._scaled_mm = wrapped
    try:
        yield calls
    finally:
        torch._scaled_mm = orig


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 2, H.HIDDEN, generator=g).to(dtype)
    gy = torch.randn(32, 2, H.HIDDEN, generator=g).to(dtype)
    return x, gy


# ---------------------------------------------------------------------------------------------
# Settings, switches, errors
# ---------------------------------------------------------------------------------------------


def test_settings_validation_and_delayed_needs_te():
    assert Fp8Settings().format == "hybrid" and Fp8Settings().recipe == "tensorwise"
    with pytest.raises(ValueError, match="fp8-format"):
        Fp8Settings(format="e5m2")
    with pytest.raises(ValueError, match="fp8-recipe"):
        Fp8Settings(recipe="mxfp8")
    with pytest.raises(ValueError, match="needs --transformer-impl transformer_engine"):
        check_backend("local", Fp8Settings(recipe="delayed"))
    with pytest.raises(ValueError, match="needs --transformer-impl transformer_engine"):
        with fp8_context(True, recipe="delayed"):
            pass
    assert check_backend("local", Fp8Settings(format="e4m3")).name == "torchao"
    s = Fp8Settings(format="e4m3", recipe="tensorwise", amax_history_len=16)
    assert Fp8Settings.from_config(type("C", (), s.transformer_config_kwargs())()) == s


def test_recipe_rules_are_one_line_each():
    from megatron_sd3.backends.fp8_settings import recipe_problem

    assert recipe_problem("tensorwise", "hybrid", "local", 2) is None
    assert recipe_problem("rowwise", "e4m3", "local", 1) is None
    assert recipe_problem("delayed", "hybrid", "transformer_engine", 4) is None
    for args, words in [(("delayed", "hybrid", "local"), "needs --transformer-impl transformer_engine"),
                        (("rowwise", "hybrid", "local"), "use --fp8-format e4m3"),
                        (("rowwise", "e4m3", "local", 2), "--tensor-model-parallel-size 1 only"),
                        (("rowwise", "e4m3", "transformer_engine"), "torchao's recipe")]:
        line = recipe_problem(*args)
        assert line and words in line and "\n" not in line, (args, line)
    with pytest.raises(ValueError, match="use --fp8-format e4m3"):
        check_backend("local", Fp8Settings(format="hybrid", recipe="rowwise"))
    with pytest.raises(ValueError, match="torchao's recipe"):
        check_backend("transformer_engine", Fp8Settings(format="e4m3", recipe="rowwise"))


def test_rowwise_is_torchaos_rowwise_recipe():
    from torchao.float8.config import Float8LinearConfig, ScalingGranularity

    c = F.float8_linear_config(Fp8Settings("e4m3", "rowwise"))
    assert c == Float8LinearConfig.from_recipe_name("rowwise")
    for cc in (c.cast_config_input, c.cast_config_weight, c.cast_config_grad_output):
        assert cc.scaling_granularity is ScalingGranularity.AXISWISE and cc.target_dtype == torch.float8_e4m3fn
    assert c.round_scales_to_power_of_2


def test_torchao_config_formats():
    from torchao.float8.config import ScalingGranularity, ScalingType

    for fmt, gdt in (("e4m3", torch.float8_e4m3fn), ("hybrid", torch.float8_e5m2)):
        c = F.float8_linear_config(Fp8Settings(format=fmt))
        for cc in (c.cast_config_input, c.cast_config_weight, c.cast_config_grad_output):
            assert cc.scaling_type is ScalingType.DYNAMIC
            assert cc.scaling_granularity is ScalingGranularity.TENSORWISE
        assert c.cast_config_input.target_dtype == torch.float8_e4m3fn
        assert c.cast_config_weight.target_dtype == torch.float8_e4m3fn
        assert c.cast_config_grad_output.target_dtype == gdt
        assert c.cast_config_grad_output_for_grad_weight.target_dtype == gdt


@pytest.mark.skipif(TE.transformer_engine_available(), reason="Transformer Engine is installed")
def test_transformer_engine_missing_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs NVIDIA Transformer Engine") as err:
        TE.require_transformer_engine()
    assert "\n" not in str(err.value) and "--transformer-impl local" in str(err.value)
    with pytest.raises(RuntimeError, match="needs NVIDIA Transformer Engine"):
        check_backend("transformer_engine", Fp8Settings())
    with pytest.raises(RuntimeError, match="needs NVIDIA Transformer Engine"):
        check_backend("transformer_engine")  # bf16 too: the modules are TE's
    from megatron_sd3.models.mmdit_layer_specs import get_mmdit_layer_spec

    with pytest.raises(RuntimeError, match="needs NVIDIA Transformer Engine"):
        get_mmdit_layer_spec("transformer_engine")
    cfg = type("C", (), {"fp8": "hybrid", "fp8_recipe": "delayed"})()
    with pytest.raises(RuntimeError, match="needs NVIDIA Transformer Engine"):
        TE.te_fp8_context(cfg)
    # FP8 off: megatron's own (null) context, no error
    with TE.te_fp8_context(type("C", (), {"fp8": None, "fp8_param": False})()):
        pass


def test_context_nesting_and_first_last_bf16():
    assert not F.fp8_enabled()
    with fp8_context(True, "e4m3") as s:
        assert F.fp8_enabled() and s.format == "e4m3"
        with fp8_context(False):
            assert not F.fp8_enabled() and F.current_fp8_settings() is None
        assert F.current_fp8_settings() == s
    assert not F.fp8_enabled()

    cfg = type(
        "C",
        (),
        dict(
            fp8="hybrid", fp8_recipe="tensorwise", fp8_amax_history_len=1,
            fp8_amax_compute_algo="most_recent", first_last_layers_bf16=True,
            num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1, num_layers=4,
        ),
    )()
    seen = []
    with fp8_context(True):  # an outer FP8 region: bf16 layers must still be bf16
        for layer_no in range(4):
            with backends.get_backend("torchao").layer_fp8_context(cfg, layer_no):
                seen.append(F.fp8_enabled())
    assert seen == [False, True, True, False]
    with F.get_local_fp8_context(type("C", (), {"fp8": None})()):
        assert not F.fp8_enabled()


def test_spec_provider():
    p = backends.backend_for("local", fp8=True).spec_provider()
    assert p.column_parallel_linear() is Float8ColumnParallelLinear
    assert p.row_parallel_linear() is Float8RowParallelLinear
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    assert issubclass(Float8ColumnParallelLinear, ColumnParallelLinear)
    assert issubclass(Float8RowParallelLinear, RowParallelLinear)


def test_registry_names_and_unknown_backend():
    assert backends.backend_names() == ("local", "torchao", "transformer_engine")
    assert backends.TRANSFORMER_IMPLS == ("local", "transformer_engine")
    assert backends.backend_for("local").name == "local"
    assert backends.backend_for("local", fp8=True).name == "torchao"
    with pytest.raises(ValueError) as err:
        backends.get_backend("apex")
    msg = str(err.value)
    assert "\n" not in msg and "'apex'" in msg
    assert "local, torchao, transformer_engine" in msg
    with pytest.raises(ValueError, match="--transformer-impl must be one of local, transformer_engine"):
        check_backend("te")
    from megatron_sd3.models.mmdit_layer_specs import get_mmdit_layer_spec

    with pytest.raises(ValueError, match="--transformer-impl must be one of"):
        get_mmdit_layer_spec("te")


def _tiny_fp8_model(fp8="hybrid", **parallel):
    """The tiny model, FP8 ``fp8`` (None: off) with more ``parallel`` fields."""
    from megatron_sd3.config import make_config
    from megatron_sd3.models.sd3_model import SD3Model

    parallel = {"fp8": fp8, **parallel} if fp8 else parallel
    return SD3Model(make_config("tiny", zero_init_adaln=False, parallel=parallel))


def _tiny_batch(cfg):
    from megatron_sd3.testing.helpers import tiny_forward_inputs

    return tiny_forward_inputs(cfg)


def _record_blocks(model, events, what):
    for block in model.blocks:
        block.register_forward_pre_hook(
            lambda mod, args: events.append((f"block{mod.layer_number}", what())))
    model.head.register_forward_pre_hook(lambda mod, args: events.append(("head", what())))


def test_torchao_fp8_context_is_per_block(tp1):
    """tensorwise (torchao): each block runs in its own FP8 context (a fresh one per block, so
    --first-last-layers-bf16 applies), and nothing outside the blocks is in FP8."""
    model = _tiny_fp8_model(first_last_layers_bf16=True, num_layers_at_start_in_bf16=1,
                            num_layers_at_end_in_bf16=0)
    assert model.backend.name == "torchao"
    events = []
    _record_blocks(model, events, lambda: (F.fp8_enabled(), len(F._FP8_STACK)))
    with count_scaled_mm() as calls:
        model(**_tiny_batch(model.config))
    n = model.config.num_layers
    assert events == [("block1", (False, 2))] + [(f"block{i}", (True, 2)) for i in range(2, n + 1)] \
        + [("head", (False, 1))]
    assert calls  # blocks 2.. really ran FP8 GEMMs


def test_te_fp8_context_policy_delayed_once_tensorwise_per_block(tp1, monkeypatch):
    """megatron's TransformerBlock policy, as the transformer_engine backend applies it: delayed
    recipe -> ONE context around all blocks of the pass; other recipes -> one per block.
    (megatron's get_fp8_context is replaced by a recorder: TE is not installed here.)"""
    import megatron.core.fp8_utils as fp8_utils

    opened = []

    @contextlib.contextmanager
    def recording_context(config, layer_no=-1, is_init=False):
        opened.append(layer_no)
        events.append(("enter", layer_no))
        yield
        events.append(("exit", layer_no))

    monkeypatch.setattr(fp8_utils, "get_fp8_context", recording_context)
    monkeypatch.setattr(TE, "require_transformer_engine", lambda: None)
    for recipe in ("delayed", "tensorwise"):
        model = _tiny_fp8_model(fp8_recipe=recipe)
        model.backend = backends.get_backend("transformer_engine")  # the policy under test
        events, opened = [], []
        _record_blocks(model, events, lambda: None)
        model(**_tiny_batch(model.config))
        n = model.config.num_layers
        blocks = [(f"block{i}", None) for i in range(1, n + 1)]
        if recipe == "delayed":
            assert opened == [-1]
            assert events == [("enter", -1), *blocks, ("exit", -1), ("head", None)]
        else:
            assert opened == list(range(n))
            expected = []
            for i, b in enumerate(blocks):
                expected += [("enter", i), b, ("exit", i)]
            assert events == expected + [("head", None)]


def test_fp8_pads_the_text_stream_to_a_multiple_of_16():
    from megatron_sd3.config import make_config

    assert make_config("sd3_light", parallel={"fp8": "hybrid"}).padded_text_len == 336
    assert make_config("sd3_light").padded_text_len == 333


# ---------------------------------------------------------------------------------------------
# Single process (TP=1): FP8 ran, and is close to fp32
# ---------------------------------------------------------------------------------------------


def test_fp8_off_is_exactly_megatron(tp1):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    w = H.full_weights()
    col, row = build_fp8_pair(w)
    cfg = parallel_linear_config()
    noop = lambda t: None  # noqa: E731
    ref_col = ColumnParallelLinear(H.HIDDEN, H.FFN, config=cfg, init_method=noop, bias=True)
    ref_row = RowParallelLinear(
        H.FFN, H.HIDDEN, config=cfg, init_method=noop, bias=True, input_is_parallel=True,
        skip_bias_add=False,
    )
    ref_col.load_state_dict(col.state_dict())
    ref_row.load_state_dict(row.state_dict())
    x, gy = _inputs()
    with count_scaled_mm() as calls:
        ours = H.run_pair(col, row, x, gy, None)
    assert calls == []
    ref = H.run_pair(ref_col, ref_row, x, gy, None)
    for k in ours:
        assert torch.equal(ours[k], ref[k]), k


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16])
def test_fp8_pair_close_to_fp32(tp1, fmt, params_dtype):
    w = H.full_weights()
    x, gy = _inputs()
    ref = H.run_pair(*build_fp8_pair(w, torch.float32), x, gy, None)
    col, row = build_fp8_pair(w, params_dtype)
    with count_scaled_mm() as calls:
        out = H.run_pair(col, row, x.to(params_dtype), gy.to(params_dtype), Fp8Settings(fmt))
    # 3 GEMMs (output, grad_input, grad_weight) per layer, all through torch._scaled_mm
    assert len(calls) == 6
    fp8_dtypes = {d for c in calls for d in c}
    if fmt == "hybrid":
        assert fp8_dtypes == {torch.float8_e4m3fn, torch.float8_e5m2}
    else:
        assert fp8_dtypes == {torch.float8_e4m3fn}
    # close to fp32 (e4m3 has 3 mantissa bits, e5m2 2: a few % per GEMM) but not equal to it
    tol = {"y": 0.08, "dx": 0.12, "dw1": 0.12, "db1": 0.12, "dw2": 0.12, "db2": 0.02}
    for k, t in tol.items():
        e = rel(out[k], ref[k])
        assert e < t, (k, e)
    assert rel(out["y"], ref["y"]) > 1e-3  # FP8 really ran
    assert rel(out["dw1"], ref["dw1"]) > 1e-3


def test_rowwise_pair_scales_per_row(tp1):
    """``--fp8-recipe rowwise``: one scale per row of each operand (not one per tensor), all
    e4m3; close to fp32, and not the tensorwise numbers."""
    w = H.full_weights()
    x, gy = _inputs()
    ref = H.run_pair(*build_fp8_pair(w), x, gy, None)
    tensorwise = H.run_pair(*build_fp8_pair(w), x, gy, Fp8Settings("e4m3"))
    scales = []
    with count_scaled_mm(scales) as calls:
        out = H.run_pair(*build_fp8_pair(w), x, gy, Fp8Settings("e4m3", "rowwise"))
    assert len(calls) == 6 and {d for c in calls for d in c} == {torch.float8_e4m3fn}
    # the forward GEMMs: one scale per token of the input and per output feature of the weight;
    # torchao runs the backward ones (no fast accumulation) with unit scales and applies the
    # per-row scales to the output afterwards
    tokens = x.shape[0] * x.shape[1]
    assert scales[:2] == [(tokens, H.FFN), (tokens, H.HIDDEN)], scales
    for k, t in {"y": 0.08, "dx": 0.12, "dw1": 0.12, "dw2": 0.12}.items():
        assert rel(out[k], ref[k]) < t, k
    assert rel(out["y"], tensorwise["y"]) > 1e-4


@pytest.mark.parametrize("fmt,recipe", [("hybrid", "tensorwise"), ("e4m3", "rowwise")])
def test_same_numbers_as_torchao_float8_linear(tp1, fmt, recipe):
    """At TP=1 our layer computes exactly what torchao's own Float8Linear computes, with the
    tensorwise and with the rowwise recipe."""
    from torchao.float8.float8_linear import Float8Linear

    w = H.full_weights()
    col, _ = build_fp8_pair(w)
    settings = Fp8Settings(fmt, recipe)
    lin = torch.nn.Linear(H.HIDDEN, H.FFN, bias=True)
    with torch.no_grad():
        lin.weight.copy_(w["w1"])
        lin.bias.copy_(w["b1"])
    from torchao.float8.config import Float8LinearConfig

    ref_config = Float8LinearConfig.from_recipe_name("rowwise") if recipe == "rowwise" else \
        F.float8_linear_config(settings)
    ref_mod = Float8Linear.from_float(lin, config=ref_config)
    x, _ = _inputs()
    gy = torch.randn(32, 2, H.FFN, generator=torch.Generator().manual_seed(7))
    outs = []
    for mod in (col, ref_mod):
        xi = x.clone().requires_grad_(True)
        mod.zero_grad(set_to_none=True)
        with fp8_context(True, settings=settings):
            y = mod(xi)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(gy)
        outs.append((y.detach(), xi.grad, mod.weight.grad, mod.bias.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# TP=2 equals TP=1 (agreed amax), and differs without the all-reduce
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["hybrid"])
def test_tp2_equals_tp1_with_agreed_amax(tp1, tmp_path, fmt):
    import torch.multiprocessing as mp

    mp.spawn(H.tp_worker, args=(2, free_port(), str(tmp_path), fmt), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))

    def assemble(res):
        return {
            "y": res[0]["y"], "dx": res[0]["dx"], "db2": res[0]["db2"],
            "dw1": torch.cat([res[0]["dw1"], res[1]["dw1"]], 0),
            "db1": torch.cat([res[0]["db1"], res[1]["db1"]], 0),
            "dw2": torch.cat([res[0]["dw2"], res[1]["dw2"]], 1),
        }

    w = H.full_weights()
    x, gy = _inputs()
    col, row = build_fp8_pair(w)
    tp1_fp8 = H.run_pair(col, row, x, gy, Fp8Settings(fmt))
    tp1_hp = H.run_pair(col, row, x, gy, None)

    # replicated outputs agree across the two TP ranks
    for agree in (True, False):
        assert torch.allclose(r0[agree]["y"], r1[agree]["y"], rtol=0, atol=1e-6)
    hp = assemble({0: r0["hp"], 1: r1["hp"]})
    agreed = assemble({0: r0[True], 1: r1[True]})
    local = assemble({0: r0[False], 1: r1[False]})
    for k in agreed:
        assert rel(hp[k], tp1_hp[k]) < 1e-5, k  # sanity: the harness itself is exact
        e_agreed = rel(agreed[k], tp1_fp8[k])
        assert e_agreed < 1e-5, (k, e_agreed)  # same scales -> same FP8 bits, fp32 sum order
    # without the amax all-reduce the split operands get per-shard scales: TP changes results
    for k in ("y", "dx", "dw1", "dw2"):
        assert rel(local[k], tp1_fp8[k]) > 1e-3, k


# ---------------------------------------------------------------------------------------------
# A tiny training loop: FP8 tracks fp32
# ---------------------------------------------------------------------------------------------


def _train(settings, steps=20):
    torch.manual_seed(0)
    w = H.full_weights(seed=3)
    col, row = build_fp8_pair(w)
    teacher = H.full_weights(seed=4)
    g = torch.Generator().manual_seed(5)
    params = [col.weight, col.bias, row.weight, row.bias]
    opt = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4, H.HIDDEN, generator=g)
        with torch.no_grad():
            h = torch.nn.functional.gelu(x @ teacher["w1"].t() + teacher["b1"], approximate="tanh")
            target = h @ teacher["w2"].t() + teacher["b2"]
        ctx = fp8_context(True, settings=settings) if settings else fp8_context(False)
        with ctx:
            y = H.pair_forward(col, row, x)
        loss = torch.nn.functional.mse_loss(y, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fmt,recipe", [("hybrid", "tensorwise"), ("e4m3", "tensorwise"), ("e4m3", "rowwise")])
def test_fp8_training_tracks_fp32(tp1, fmt, recipe):
    ref = _train(None)
    with count_scaled_mm() as calls:
        ours = _train(Fp8Settings(fmt, recipe))
    assert len(calls) == 6 * 20
    assert ref[-1] < 0.5 * ref[0]  # it learns
    errs = [abs(a - b) / b for a, b in zip(ours, ref)]
    assert max(errs) < 0.02, errs
    assert ours != ref


# ---------------------------------------------------------------------------------------------
# torch.compile: a joint block is one graph, FP8 on or off
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8,recipe,gemms", [(None, None, "all"), ("hybrid", "tensorwise", "all"),
                                             ("e4m3", "rowwise", "all"), ("hybrid", "tensorwise", "rule")])
def test_compiled_block_is_one_graph(tp1, fp8, recipe, gemms):
    """torch.compile traces a whole joint block, its FP8 GEMMs with their amax, scales and casts
    included, as one graph: no graph break at any GEMM (with ``--fp8-gemms rule`` the rule is a
    constant of the graph; at the tiny widths it keeps every GEMM in bf16)."""
    from megatron_sd3.testing.helpers import block_graphs, tiny_forward_inputs

    model = _tiny_fp8_model(fp8, fp8_recipe=recipe, fp8_gemms=gemms) if fp8 else _tiny_fp8_model(None)
    inputs = tiny_forward_inputs(model.config)
    with count_scaled_mm() as calls:
        ex = block_graphs(model, inputs)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [r.reason[:200] for r in ex.break_reasons]
    assert bool(calls) == (bool(fp8) and gemms == "all")  # FP8 runs really went through torch._scaled_mm


def test_per_gemm_regions_break_before_every_fp8_gemm(tp1, monkeypatch):
    """``COMPILE_REGIONS = "gemm"`` (the benchmark's ``fp8-per-gemm`` variant) makes each FP8
    GEMM a compiled region of its own: a graph break before every forward GEMM of the block."""
    from megatron_sd3.testing.helpers import block_graphs, block_inputs, tiny_forward_inputs

    model = _tiny_fp8_model("hybrid")
    inputs = tiny_forward_inputs(model.config)
    args, kwargs = block_inputs(model, inputs)
    with count_scaled_mm() as calls, F.fp8_context(True, settings=Fp8Settings("hybrid")), torch.no_grad():
        model.blocks[1](*args, **kwargs)
    gemms = len(calls)
    assert gemms >= 8  # qkv, out projection, fc1, fc2 of both streams
    monkeypatch.setattr(F, "COMPILE_REGIONS", "gemm")
    ex = block_graphs(model, inputs)
    # every break is the one before an FP8 GEMM (dynamo counts one per frame of the call stack)
    assert {r.user_stack[-1].name for r in ex.break_reasons} == {"float8_parallel_gemm"}
    assert len(ex.break_reasons) >= gemms and ex.graph_count > gemms, (ex.graph_count, gemms)


# ---------------------------------------------------------------------------------------------
# FLOP count (megatron_sd3/flops.py)
# ---------------------------------------------------------------------------------------------


def test_mmdit_flops_formula():
    from megatron_sd3.flops import PEAK_TFLOPS, mfu, mmdit_flops_per_sample, peak_tflops

    L, h, f, i, t = 2, 64, 256, 16, 8
    s = i + t
    per_layer = (
        2 * (3 * h * h + h * h + 2 * h * f) * (i + t)  # qkv, out, MLP of both streams
        + 2 * 2 * (6 * h * h)  # adaLN modulation, both streams, per sample
        + 2 * 2 * s * s * h  # scores + values
    )
    assert mmdit_flops_per_sample(L, h, f, i, t, text_recon=True) == L * per_layer
    # without text recon nothing reads the last block's text output: its out proj + MLP are skipped
    unused = 2 * (h * h + 2 * h * f) * t
    assert mmdit_flops_per_sample(L, h, f, i, t) == L * per_layer - unused
    dual = 2 * (3 * h * h + h * h) * i + 2 * 2 * i * i * h + 2 * 3 * h * h  # + 3 more mod chunks
    assert mmdit_flops_per_sample(L, h, f, i, t, 1, True) == L * per_layer + dual
    assert mmdit_flops_per_sample(L, h, f, i, t, text_recon=True, training=True) == 3 * L * per_layer
    # SD3 at 1024 px (64x64 patches = 4096 img tokens, 333 text tokens): a 2B model, ~1e13 F/sample
    fl = mmdit_flops_per_sample(24, 1536, 6144, 4096, 333)
    assert 5e12 < fl < 5e13
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == PEAK_TFLOPS["H100"]["bf16"]
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp8") == 2 * PEAK_TFLOPS["H100"]["bf16"]
    assert peak_tflops("cpu", "bf16") is None
    assert math.isclose(mfu(989.0e12 / 2, "H100", "bf16"), 0.5, rel_tol=1e-3)


# ---------------------------------------------------------------------------------------------
# --fp8-gemms: FP8 only where it pays (fp8_settings.gemm_in_fp8, the step-time model)
# ---------------------------------------------------------------------------------------------


def test_the_rule_on_sd3_light_shapes():
    """The modulation (micro-batch rows) never pays; at sd3_light's width (1024 px, micro batch 4)
    no GEMM does (the measured 0.97x); at a width where the FLOPs outgrow the casts, the large
    image GEMMs do. ``all`` is every GEMM; anything else is one line."""
    from megatron_sd3.backends.fp8_settings import gemm_in_fp8, model_gpu

    rows = 4 * 4096
    assert not gemm_in_fp8("rule", 4, 1536, 9 * 1536)  # modulation
    assert not gemm_in_fp8("rule", rows, 1536, 6144)  # sd3_light's image MLP
    assert not gemm_in_fp8("rule", 4 * 336, 1536, 6144)  # the text stream's
    assert gemm_in_fp8("rule", rows, 16384, 4 * 16384)  # a 16384-wide model's image MLP
    assert not gemm_in_fp8("rule", 4, 16384, 9 * 16384)  # and its modulation
    assert gemm_in_fp8("all", 4, 1536, 9 * 1536)
    with pytest.raises(ValueError, match="--fp8-gemms must be one of"):
        gemm_in_fp8("some", 4, 8, 8)
    with pytest.raises(ValueError, match="--fp8-gemms must be one of"):
        Fp8Settings(gemms="some")
    assert model_gpu("NVIDIA H200") == "h200" and model_gpu("NVIDIA H100 80GB HBM3") == "h100"
    assert model_gpu(None) == "h100"


def test_the_torchao_layers_ask_the_rule_per_gemm(tp1, monkeypatch):
    """Under ``rule`` each torchao GEMM asks gemm_in_fp8 with its rows and per-rank features: the
    tiny pair's GEMMs do not pay (the local backend's F.linear: FP8 off's numbers to float
    rounding, addmm against megatron's matmul + add, far inside FP8's few-% error); where the model
    says they pay, both layers run FP8 (3 GEMMs each through torch._scaled_mm)."""
    import megatron_sd3.backends.fp8_settings as fs
    import megatron_sd3.step_time as st

    w = H.full_weights()
    x, gy = _inputs()
    off = H.run_pair(*build_fp8_pair(w), x, gy, None)
    with count_scaled_mm() as calls:
        ruled = H.run_pair(*build_fp8_pair(w), x, gy, Fp8Settings("hybrid", gemms="rule"))
    assert calls == []
    for k in off:
        assert rel(ruled[k], off[k]) < 1e-5, k
    asked = []
    fs._gemm_pays.cache_clear()  # the decisions above are cached per shape
    monkeypatch.setattr(st, "fp8_pays", lambda g, gpu, cal=None: asked.append((g.m, g.k, g.n, gpu)) or True)
    try:
        with count_scaled_mm() as calls:
            H.run_pair(*build_fp8_pair(w), x, gy, Fp8Settings("hybrid", gemms="rule"))
    finally:
        fs._gemm_pays.cache_clear()  # no planted decision outlives the test
    assert len(calls) == 6
    assert sorted(set(asked)) == sorted({(64, H.HIDDEN, H.FFN, "h100"), (64, H.FFN, H.HIDDEN, "h100")}), asked


# ---------------------------------------------------------------------------------------------
# Weight scales once per step (the torchao backend's step_context)
# ---------------------------------------------------------------------------------------------


def _fp8_steps(precompute: bool, monkeypatch, steps: int = 3):
    """``steps`` training steps of the tiny model in FP8 (every block GEMM), 2 micro batches each,
    through ``TrainStep``; returns the losses, the parameters after, and how many weight scales
    the GEMMs computed themselves (``_cast_agreed`` calls)."""
    from megatron_sd3.config import make_config
    from megatron_sd3.testing.helpers import tiny_forward_inputs
    from megatron_sd3.training.build import build_training, unwrap
    from megatron_sd3.training.step import TrainStep

    monkeypatch.setattr(F, "PRECOMPUTE_WEIGHT_SCALES", precompute)
    calls = []
    orig = F._cast_agreed
    monkeypatch.setattr(F, "_cast_agreed", lambda *a, **k: calls.append(1) or orig(*a, **k))
    cfg = make_config("tiny", zero_init_adaln=False, parallel={"fp8": "hybrid"})
    built = build_training(cfg, optimizer=dict(lr=1e-2))
    step = TrainStep(built.cfg, built.ddp, built.optimizer, global_batch_size=4, micro_batch_size=2, seed=1)
    losses = []
    for i in range(steps):
        mbs = [{k: v for k, v in tiny_forward_inputs(cfg, micro_batch=2, latent=8).items() if k != "timestep"}
               for _ in range(2)]
        batch = [dict(latents=m["hidden_states"] * (1 + i), prompt_embeds=m["encoder_hidden_states"],
                      pooled_prompt_embeds=m["pooled_projections"]) for m in mbs]
        res = step(batch, 4 * i)
        assert not res.skipped
        losses.append(res.losses["loss"])
    params = {n: p.detach().clone() for n, p in unwrap(built.chunks[0]).named_parameters()}
    built.free()
    return losses, params, len(calls)


def test_weight_scales_once_per_step_train_the_same_bits(tp1, monkeypatch):
    """Inside a training step the FP8 weights' scales are computed once, for all layers at once,
    instead of in every GEMM of every micro batch: the same losses and parameters, bit for bit,
    and no weight scale computed by a GEMM (the 33 FP8 linears x 2 micro batches before)."""
    ref_losses, ref_params, ref_casts = _fp8_steps(False, monkeypatch)
    losses, params, casts = _fp8_steps(True, monkeypatch)
    assert ref_casts == 3 * 2 * 33 and casts == 0
    assert losses == ref_losses and ref_losses[0] != ref_losses[-1]
    assert all(torch.equal(params[n], ref_params[n]) for n in ref_params)
