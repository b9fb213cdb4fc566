"""FP8 training of the whole model through the real training path, on CPU.

The tiny preset (4 joint blocks, hidden 64) is trained on CPU with megatron-core's schedules,
DDP and optimizer (``TrainStep``), FP8 GEMMs from the local backend (torchao float8 inside
megatron's parallel linears), by ``tests/_fp8_train_worker.py`` in 1 or 2 gloo processes.
Text is 13 tokens per sample, so FP8 mode pads the text stream to 16 (pads sliced out of the
attention sequence and left out of the text-recon loss) while the fp32 reference runs unpadded.

Bounds (and what a 2-core CPU measured):

* FP8 (hybrid, fp32 params) vs fp32, 20 steps: |loss_fp8 - loss_fp32| / loss_fp32 <= 2 %
  at every step; measured max 9.6e-5.
* FP8 TP=2 vs FP8 on one rank, both in float64 around the FP8 casts (``--float64``: float64
  parameters and arithmetic, the FP8 GEMM's products summed in float64, tests/_fp8_train_worker.py),
  3 steps with Adam made linear in the gradients (tests/_bounds.py). The scales agree (each
  amax all-reduced over TP in its own precision), so every operand is cast on the same FP8 grid,
  and a cast absorbs the layout's float64 rounding of its input: the runs differ only by the
  float64 reductions a layout reorders, within the float64 bounds of tests/_bounds.py (losses
  LOSS_BOUND64, gradient norms NORM_BOUND64, every tensor's update BOUND64; measured: losses
  equal, updates 9e-16). The exception is a flip: an operand element within the layout's
  rounding (about BOUND64 of it) of an FP8 rounding boundary (boundaries lie 2^-3 of an element
  apart in e4m3, 2^-2 in e5m2) rounds the other way; with values spread over the grid that
  happens to an element with probability below 2 * BOUND64 / 2^-3 = 5.5e-11, and to any of the
  run's ~1e7 cast elements with probability below 6e-4. (In fp32 a flip is likely: one moved
  a tensor's update by 2.9e-3 under ATEN_CPU_CAPABILITY=default.)
* FP8 CP=2 vs FP8 on one rank (float64 as above). Under CP every GEMM input and output gradient
  is cast with its amax agreed over TP x CP (megatron's TP x CP amax reduction group, as
  Transformer Engine reduces it), so the forward casts every operand on one rank's grid: step 0's
  losses are held to LOSS_BOUND64 (measured: equal). The backward differs by design: the text
  stream is replicated over CP and each CP rank's gradient into it is a partial sum (its heads'
  share), cast to e5m2 on its own, where one rank casts the whole sum. Each run rounds an element
  to within half a spacing, 2^-3 of it in e5m2, so the two differ by at most 2^-3 (|g_1| + |g_2|
  + |g|) = 2^-2 |g| per element when the partial sums have one sign; a tensor's gradient (and,
  with Adam linear in it, its update) made of such products without cancellation differs by at
  most 2^-2. That premise (no cancellation) is stated, not checked: a bias gradient sums over
  tokens and can cancel. Gradient norms, later losses and updates are held to 2^-2 (measured:
  norms 3e-9, later losses 1.5e-11, updates 2.8e-2 at most, in the text MLP's first bias).
* FP8 PP=2 vs FP8 on one rank (e4m3, bf16 params, gamma > 0 with the target on the first stage,
  so the padded target travels in the pipeline message): losses and parameters identical up to
  fp summation order (<= 1e-6; measured: bit-identical).
* gamma > 0 in FP8 (e4m3, bf16 params): text_recon_loss > 0 and finite at every step, total loss
  within 2 % of fp32 (measured 5.0e-4), the last block's text stream (used only by the recon
  loss) is trained.
* bf16 padded vs unpadded text, same weights: relative difference <= 2e-3 (below the 5.6e-3
  bf16-vs-fp32 gap of the same model; measured: bit-identical on CPU).

``--fp8-recipe delayed`` with the local backend being a clear error is tested in test_fp8.py
(``test_settings_validation_and_delayed_needs_te``).
"""
import functools
import math

import pytest
import torch

from _bounds import ADAM_EPS, BOUND64, LOSS_BOUND64, LR, NORM_BOUND64
from _ranks import run_training_worker

WORKER = "tests/_fp8_train_worker.py"
TRACK_STEPS = 20
CMP_STEPS = 3  # TP / PP comparisons
RECON_STEPS = 6

# (nproc, args): the four worker runs; the single-rank ones also give the TP / PP references.
FP8_1 = (1, ("--fp8", "hybrid", "--ref", "fp32", "--steps", str(TRACK_STEPS), "--snapshot-at", str(CMP_STEPS)))
LINEAR = ("--lr", str(LR), "--adam-eps", str(ADAM_EPS))  # Adam linear in the gradients
F64 = ("--float64",)
FP8_1_CMP = (1, ("--fp8", "hybrid", "--steps", str(CMP_STEPS), "--snapshot-at", str(CMP_STEPS), *LINEAR, *F64))
FP8_TP2 = (2, ("--fp8", "hybrid", "--tp", "2", "--steps", str(CMP_STEPS), *LINEAR, *F64))
FP8_CP2 = (2, ("--fp8", "hybrid", "--cp", "2", "--steps", str(CMP_STEPS), *LINEAR, *F64))
RECON = ("--fp8", "e4m3", "--bf16", "--gamma", "0.5", "--target", "1")
RECON_1 = (1, (*RECON, "--ref", "fp32", "--steps", str(RECON_STEPS), "--snapshot-at", str(CMP_STEPS)))
RECON_PP2 = (2, (*RECON, "--pp", "2", "--steps", str(CMP_STEPS)))
ROWWISE_1 = (1, ("--fp8", "e4m3", "--fp8-recipe", "rowwise", "--ref", "fp32", "--steps", str(RECON_STEPS)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fp8_training"))


@functools.lru_cache(maxsize=None)
def _run(nproc: int, args: tuple, tmp_root: str):
    return run_training_worker(WORKER, nproc, list(args), tmp_root, timeout=240)


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def _tensor_rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _global_rel(p, ref):
    num = sum(float((p[k] - ref[k]).pow(2).sum()) for k in ref)
    den = sum(float(ref[k].pow(2).sum()) for k in ref)
    return math.sqrt(num / den)


def _compare_parallel(root, run, ref_run, loss_tol, norm_tol, global_tol, tensor_tol, updates=False):
    """``updates``: compare the parameters' change over the steps (the reference's initial ones
    are every layout's), not the parameters."""
    ranks, params = _run(*run, root)
    (ref,), ref_params = _run(*ref_run, root)
    if updates:
        p0 = ref["params0"]
        params = {k: v - p0[k] for k, v in params.items()}
        ref_params = {k: v - p0[k] for k, v in ref_params.items()}
    for r in ranks:
        assert r["scaled_mm_calls"] > 0, "no FP8 GEMM ran"
        for got, want in zip(r["losses"], ref["losses"][:CMP_STEPS], strict=False):
            for k in ("loss", "denoise_loss", "text_recon_loss"):
                assert _rel(got[k], want[k]) <= loss_tol, f"{k}: relative {_rel(got[k], want[k]):.2e} > {loss_tol:.2e}"
    norms = [n for n in ranks[-1]["grad_norms"]]
    for got, want in zip(norms, ref["grad_norms"][:CMP_STEPS]):
        assert _rel(got, want) <= norm_tol, (norms, ref["grad_norms"])
    assert params.keys() == ref_params.keys()
    assert _global_rel(params, ref_params) <= global_tol
    worst = max((_tensor_rel(params[k], ref_params[k]), k) for k in ref_params)
    assert worst[0] <= tensor_tol, f"{worst[1]}: relative {worst[0]:.2e} > {tensor_tol:.2e}"
    return ranks, ref


@pytest.mark.timeout(240)
def test_fp8_training_tracks_fp32(root):
    (r,), _ = _run(*FP8_1, root)
    fp8 = [x["loss"] for x in r["losses"]]
    fp32 = [x["loss"] for x in r["ref_losses"]]
    assert len(fp8) == len(fp32) == TRACK_STEPS
    # FP8 linears: 4 blocks x 2 streams x (qkv, proj, fc1, fc2) + 2 dual-attention blocks x
    # (qkv, proj) = 36, minus the last block's unused text proj/fc1/fc2 (gamma = 0) = 33; each
    # runs 3 GEMMs (forward, grad-input, grad-weight) per microbatch (4 per step).
    assert r["scaled_mm_calls"] == 33 * 3 * 4 * TRACK_STEPS
    assert all(math.isfinite(v) for v in fp8)
    assert fp8 != fp32, "FP8 gave bit-identical losses: it did not run"
    errs = [_rel(a, b) for a, b in zip(fp8, fp32)]
    assert max(errs) <= 0.02, errs
    assert sum(fp8[-5:]) < sum(fp8[:5])  # it learns


@pytest.mark.timeout(240)
def test_fp8_rowwise_training_tracks_fp32(root):
    """``--fp8-recipe rowwise`` on the real model (its linears get sequence-first, non-contiguous
    inputs): every FP8 GEMM runs, the losses track fp32 and differ from the tensorwise run's."""
    (r,), _ = _run(*ROWWISE_1, root)
    (t,), _ = _run(*FP8_1, root)
    assert r["scaled_mm_calls"] == 33 * 3 * 4 * RECON_STEPS
    rowwise, fp32 = [x["loss"] for x in r["losses"]], [x["loss"] for x in r["ref_losses"]]
    assert max(_rel(a, b) for a, b in zip(rowwise, fp32)) <= 0.02
    assert rowwise != fp32 and rowwise != [x["loss"] for x in t["losses"]][:RECON_STEPS]


@pytest.mark.timeout(240)
def test_fp8_tp2_tracks_one_rank(root):
    _compare_parallel(root, FP8_TP2, FP8_1_CMP, loss_tol=LOSS_BOUND64, norm_tol=NORM_BOUND64, global_tol=BOUND64,
                      tensor_tol=BOUND64, updates=True)


@pytest.mark.timeout(240)
def test_fp8_cp2_tracks_one_rank(root):
    """CP=2 (torchao tensorwise FP8): the forward on one rank's FP8 grids, the backward's text
    stream on its own (see the module's docstring)."""
    e5m2 = 2.0 ** -2
    ranks, ref = _compare_parallel(root, FP8_CP2, FP8_1_CMP, loss_tol=e5m2, norm_tol=e5m2, global_tol=e5m2,
                                   tensor_tol=e5m2, updates=True)
    for r in ranks:  # step 0's forward: every operand cast on the same grid
        for k in ("loss", "denoise_loss", "text_recon_loss"):
            got, want = r["losses"][0][k], ref["losses"][0][k]
            assert _rel(got, want) <= LOSS_BOUND64, f"step 0 {k}: relative {_rel(got, want):.2e} > {LOSS_BOUND64:.2e}"


@pytest.mark.timeout(240)
def test_fp8_with_text_recon(root):
    (r,), _ = _run(*RECON_1, root)
    assert r["scaled_mm_calls"] > 0
    recon = [x["text_recon_loss"] for x in r["losses"]]
    assert all(math.isfinite(v) and v > 0 for v in recon), recon
    for a, b in zip(r["losses"], r["ref_losses"]):
        assert math.isfinite(a["loss"]) and _rel(a["loss"], b["loss"]) <= 0.02, (a, b)
        # same order of magnitude as fp32 (the recon loss is ~1e-5 here, so no tighter)
        assert 0.5 <= a["text_recon_loss"] / b["text_recon_loss"] <= 2.0, (a, b)
    # the last block's text stream feeds only the recon loss: it must be trained in FP8
    assert "blocks.3.context_mlp.linear_fc2.weight" in r["moved"]


@pytest.mark.timeout(240)
def test_fp8_pp2_tracks_one_rank(root):
    ranks, _ = _compare_parallel(root, RECON_PP2, RECON_1, loss_tol=1e-6, norm_tol=1e-6,
                                 global_tol=1e-6, tensor_tol=1e-6)
    assert ranks[0]["losses"][0]["text_recon_loss"] > 0


def test_bf16_text_padding_changes_nothing(single_process):
    """bf16 model (as Float16Module makes it) with text padded 13 -> 16 vs unpadded, same weights."""
    from megatron_sd3.config import make_config
    from megatron_sd3.models.sd3_model import SD3Model

    def build(pad, bf16=True):
        par = {"bf16": True, "params_dtype": torch.bfloat16} if bf16 else {}
        if pad:
            par["text_pad_multiple"] = pad
        cfg = make_config("tiny", zero_init_adaln=False, text_seq_len=13, text_recon_gamma=0.5,
                          text_recon_target_layer=1, parallel=par)
        m = SD3Model(cfg)
        return m.bfloat16() if bf16 else m

    plain, padded = build(None), build(16)
    assert padded.config.padded_text_len == 16 and plain.config.padded_text_len == 13
    g = torch.Generator().manual_seed(0)
    batch = dict(hidden_states=torch.randn(2, 16, 8, 6, generator=g),
                 encoder_hidden_states=torch.randn(2, 13, 32, generator=g),
                 pooled_projections=torch.randn(2, 32, generator=g),
                 timestep=torch.tensor([100.0, 900.0]))
    b16 = {k: v.to(torch.bfloat16) for k, v in batch.items()}
    outs = []
    for m in (plain, padded):
        out = m(**b16)
        assert all(o.dtype == torch.bfloat16 for o in out)
        (out[0].float().square().mean() + out[1].float().square().mean()).backward()
        outs.append(out)
    for a, b in zip(*outs):
        assert a.shape == b.shape
        assert _tensor_rel(a.float(), b.float()) <= 2e-3
    gp, gq = dict(plain.named_parameters()), dict(padded.named_parameters())
    for k, p in gp.items():
        if p.grad is not None:
            assert _tensor_rel(p.grad.float(), gq[k].grad.float()) <= 2e-3, k
    # the tolerance is below the bf16 rounding of this model (bf16 vs fp32 on the same weights)
    ref = build(None, bf16=False)(**batch)
    assert _tensor_rel(outs[0][0].float(), ref[0]) > 2e-3


@pytest.mark.timeout(300)
def test_compiled_fp8_block_is_one_graph_at_tp2():
    """At TP=2 torch.compile still traces an FP8 joint block as one graph: the row-parallel
    layers' output, which megatron all-reduces in place, is not the view torchao's matmul returns
    (torch.compile refuses an in-place op on that)."""
    import json

    from _ranks import run_ranks

    logs = run_ranks("tests/_compile_graphs_worker.py", 2, ["--tp", "2", "--fp8", "hybrid"], timeout=240)
    for log in logs:
        line = [ln for ln in log.splitlines() if ln.startswith("GRAPHS ")]
        assert line, log[-3000:]
        got = json.loads(line[-1][len("GRAPHS "):])
        assert (got["graphs"], got["breaks"]) == (1, 0), got
