"""Activation recomputation: every mode gives the plain run's losses and gradients.

Under PP = 2, TP = 2 (gloo, CPU), with text reconstruction off and on, and interleaved PP = 2 x 2
virtual stages (on), each mode (full uniform / block, selective) trains the same two steps as the
run without recomputation, in float64. The recomputed forward runs the same kernels on the same
inputs, so full recomputation of one block per unit (uniform 1, block 1) is the plain run to the
bit: losses, first-step gradients, and every tensor after two Adam steps. Two modes reorder sums,
and are held to the float64 bound of tests/_bounds.py instead: autograd adds the gradients of a
tensor with several consumers in the order their backward nodes run, and a recomputed unit is one
node. Under uniform 2 the conditioning vector's gradient is summed over the two blocks of a unit
before it joins the other units' (the timestep embedder's gradients differ in the last bits);
under selective recomputation the recomputed norm and activation change the order of a block's
own accumulations (its adaLN and QKV gradients). In one process: full recomputation replays the
forward's random numbers (megatron's RNG-state checkpointing) and leaves the RNG where the plain
run leaves it, and the flags are checked.
"""
import functools

import pytest
import torch

from _bounds import BOUND, BOUND64, LOSS_BOUND64
from _bounds import rel
from _ranks import run_training_worker

WORKER = "tests/_recompute_worker.py"


@functools.lru_cache(maxsize=None)
def _run(nproc: int, args: tuple, root: str):
    ranks, _ = run_training_worker(WORKER, nproc, list(args), root, timeout=600)
    return ranks


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("recompute"))


def _close(a, b, what, tol=BOUND):
    """max |a - b| <= tol x max |b|."""
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol * float(b.abs().max()), (what, err, float(b.abs().max()))


REORDERING = ("full_uniform2", "selective")  # see the module's docstring


@pytest.mark.parametrize("layout", [("--pp", "2"), pytest.param(("--tp", "2"), marks=pytest.mark.slow),  # slow: PP, VPP stay
                                    ("--pp", "2", "--vpp", "2", "--gammas", "0.5")],
                         ids=["pp2", "tp2", "pp2_vpp2"])
def test_every_mode_matches_the_plain_run(root, layout):
    for r, rank in enumerate(_run(2, layout, root)):
        res = rank["results"]
        for (gamma, mode), got in res.items():
            want = res[(gamma, "none")]
            if mode in REORDERING:
                for g, w in zip(got["losses"], want["losses"]):
                    for k in ("loss", "denoise_loss", "text_recon_loss"):
                        assert abs(g[k] - w[k]) <= LOSS_BOUND64 * abs(w[k]), (
                        f"rank {r} gamma {gamma} {mode} {k}: relative {abs(g[k] - w[k]) / abs(w[k]):.2e} "
                        f"> {LOSS_BOUND64:.2e}")
            else:
                assert got["losses"] == want["losses"], f"rank {r} gamma {gamma} {mode}: losses differ from the plain run"
            assert got["grads"].keys() == want["grads"].keys() and want["grads"]
            for n in want["grads"]:
                if mode in REORDERING:
                    _close(got["grads"][n], want["grads"][n], (r, gamma, mode, "grad", n), tol=BOUND64)
                else:
                    assert torch.equal(got["grads"][n], want["grads"][n]), (r, gamma, mode, "grad", n)
            p0 = want["params0"]
            for n, w in want["params"].items():  # each tensor's update over two Adam steps
                assert torch.equal(got["params0"][n], p0[n]), (r, gamma, mode, "initial", n)
                diff = rel(got["params"][n] - p0[n], w - p0[n])
                assert diff <= (BOUND64 if mode in REORDERING else 0), (r, gamma, mode, "update", n, diff)
            if "saved" in got:  # the planner under TP: head-sized tensors split over the ranks
                measured, planned = got["saved"]
                for part, want_bytes in planned.items():
                    if want_bytes:
                        assert abs(measured[part] / want_bytes - 1) <= 0.10, (r, gamma, mode, part)
        if gamma > 0:  # the recon loss was on and trained something
            assert res[(gamma, "none")]["losses"][0]["text_recon_loss"] > 0


def _one_process_grads(single_process, parallel, dropout_p=0.0):
    """Gradients of a tiny model (gamma > 0) whose MLPs apply dropout to linear_fc2, in float64."""
    from megatron_sd3.config import make_config
    from megatron_sd3.memory import sample_inputs
    from megatron_sd3.models.sd3_model import SD3Model
    from megatron_sd3.training.build import wrap_float16

    cfg = make_config("tiny", zero_init_adaln=False, text_recon_gamma=0.5, text_recon_target_layer=1,
                      parallel=dict(parallel, params_dtype=torch.float64))
    [model] = wrap_float16(cfg, [SD3Model(cfg)])  # float64: our own modules cast as in training
    if dropout_p:
        for block in model.blocks:
            block.mlp.linear_fc2.register_forward_hook(
                lambda m, i, o: (torch.nn.functional.dropout(o[0], dropout_p, training=True), o[1]))
    inputs = sample_inputs(cfg, (8, 6), 2)
    torch.manual_seed(7)
    vel, final, target = model(**inputs)
    (vel.square().mean() + (final - target).square().mean()).backward()
    after = torch.rand(1)  # where the RNG stands after forward + backward
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, after


FULL = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)


def test_full_recompute_replays_the_random_numbers(single_process):
    want, want_rng = _one_process_grads(single_process, {}, dropout_p=0.3)
    got, got_rng = _one_process_grads(single_process, FULL, dropout_p=0.3)
    assert got.keys() == want.keys()
    for n in want:  # two blocks per unit: the conditioning's gradient is summed in another order
        _close(got[n], want[n], n, tol=BOUND64)
    assert torch.equal(got_rng, want_rng), "the recomputation moved the RNG"


def test_selective_recompute_with_dropout_outside_its_regions(single_process):
    want, _ = _one_process_grads(single_process, {}, dropout_p=0.3)
    got, _ = _one_process_grads(single_process, dict(recompute_granularity="selective"), dropout_p=0.3)
    for n in want:  # selective recomputation reorders a block's own accumulations (see above)
        _close(got[n], want[n], n, tol=BOUND64)


@pytest.mark.parametrize("flags, message", [
    (["--recompute-granularity", "full"], "needs --recompute-method"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform"], "needs --recompute-num-layers"),
    (["--recompute-method", "block"], "need --recompute-granularity"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "2"], "drop --recompute-method"),
    (["--recompute-granularity", "selective", "--recompute-modules", "core_attn"], "choose from layernorm"),
    (["--recompute-granularity", "selective", "--torch-compile"], "eager runs"),
])
def test_bad_recompute_flags_are_one_line_errors(flags, message, capsys):
    from megatron_sd3.arguments import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--mock-data", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_config_keeps_the_selective_modules():
    from megatron_sd3.config import ConfigError, make_config

    cfg = make_config("tiny", parallel=dict(recompute_granularity="selective"))
    assert cfg.recompute_modules == ["layernorm", "qk_norm", "mlp_act"]
    cfg = make_config("tiny", parallel=dict(recompute_granularity="selective", recompute_modules=["mlp_act"]))
    assert cfg.recompute_modules == ["mlp_act"]
    with pytest.raises(ConfigError, match="unknown for the joint block"):
        make_config("tiny", parallel=dict(recompute_granularity="selective", recompute_modules=["mlp"]))


def _fp8_grads(parallel):
    from megatron_sd3.config import make_config
    from megatron_sd3.memory import sample_inputs
    from megatron_sd3.models.sd3_model import SD3Model

    cfg = make_config("tiny", zero_init_adaln=False, text_recon_gamma=0.5, text_recon_target_layer=1,
                      parallel=dict(fp8="hybrid", **parallel))
    model = SD3Model(cfg)
    calls = []
    orig = torch._scaled_mm

    def counted(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    torch._scaled_mm = counted
    try:
        vel, final, target = model(**sample_inputs(cfg, (8, 8), 2))
        (vel.square().mean() + (final - target).square().mean()).backward()
    finally:
        torch._scaled_mm = orig
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("parallel", [FULL, dict(recompute_granularity="selective")], ids=["full", "selective"])
def test_fp8_local_backend_recomputes_in_fp8(single_process, parallel):
    """torchao FP8 (the local backend): the recomputed forward runs its GEMMs in FP8 again, so the
    gradients are the FP8 run's (up to FP8 rounding flips from fp32 reassociation; a recompute
    outside FP8 would differ by the FP8 error, several %), and full recomputation repeats the
    forward GEMMs."""
    want, n_plain = _fp8_grads({})
    got, n = _fp8_grads(parallel)
    for k in want:
        _close(got[k], want[k], k, tol=1e-3)
    gemms_forward = n_plain // 3  # output, grad input, grad weight per GEMM
    assert n == (n_plain + gemms_forward if parallel is FULL else n_plain), (n, n_plain)


def test_full_recompute_with_torch_compile(single_process):
    from megatron_sd3.config import make_config
    from megatron_sd3.memory import sample_inputs
    from megatron_sd3.models.sd3_model import SD3Model

    def grads(parallel, compiled):
        cfg = make_config("tiny", num_layers=1, zero_init_adaln=False, parallel=parallel)
        model = SD3Model(cfg)
        if compiled:
            for block in model.blocks:
                block.compile()
        model(**sample_inputs(cfg, (8, 8), 2)).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    want = grads({}, compiled=False)
    got = grads(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1), compiled=True)
    for k in want:  # compiled kernels fuse differently: close, not bitwise
        _close(got[k], want[k], k, tol=1e-4)


def test_pretrain_runs_with_recompute_flags_and_reports_memory():
    from _ranks import run_ranks

    log = run_ranks("pretrain_sd3.py", 1, ["--mock-data", "--mock-latent-size", "8x6", "--train-iters", "2",
                                           "--log-interval", "1", "--global-batch-size", "4", "--micro-batch-size", "2",
                                           "--recompute-granularity", "selective", "--recompute-modules", "layernorm",
                                           "mlp_act", "--no-progress"], timeout=300)[0]
    assert "theoretical memory, recompute selective (layernorm, mlp_act), latents 8x6, 2 microbatches" in log
    assert "iteration        2/       2" in log
