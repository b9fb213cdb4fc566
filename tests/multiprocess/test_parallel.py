"""TP / PP / DP / CP (and sequence parallelism) on CPU (gloo) give the single-process losses,
gradient norms and parameter updates, to within the float64 rounding of the reductions a layout
may reorder.

Each case trains the tiny preset (4 joint blocks) for a few optimizer steps on the same global
batch with megatron-core's schedules, DDP and optimizer, in float64 (parameters, activations,
pipeline messages, gradient buffers, loss), then compares with one float64 process.

The bounds (tests/_bounds.py) come from the float64 rounding of the reductions a layout may
reorder, not from one machine's result: ``LOSS_BOUND64`` for each loss, ``NORM_BOUND64`` for the
gradient norm of every step, ``BOUND64`` (3.4e-12) for every tensor's update (the parameters after
the steps less the common initial ones). Every rank's parameters are read, and a parameter several
ranks hold (DP / CP replicas, TP ranks' gathered copies) must be the same bits on each. A bug of
relative size 1e-4 (a gradient share, one DP rank's weight, an SP slice, a pipeline message's text
tokens) lands some eight orders of magnitude above the bounds.
"""
import functools

import pytest
import torch

from _bounds import BOUND64, LOSS_BOUND64, NORM_BOUND64
from _bounds import rel as _rel
from _ranks import run_training_worker

WORKER = "tests/_parallel_worker.py"
STEPS = "2"


@functools.lru_cache(maxsize=None)
def _run(nproc: int, args: tuple, tmp_root: str):
    return run_training_worker(WORKER, nproc, [*args, "--steps", STEPS], tmp_root, timeout=300)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("parallel"))


def _compare(root, nproc, args, ref_args, ref_nproc=1, fp32_bounds=None):
    """``args`` on ``nproc`` ranks against ``ref_args`` on ``ref_nproc`` (one process), in float64
    within the float64 bounds; with ``fp32_bounds`` (loss, gradient norm, update), both in fp32
    within those."""
    f64 = () if fp32_bounds else ("--float64",)
    ranks, params = _run(nproc, (*args, *f64), root)
    ref_ranks, ref_params = _run(ref_nproc, (*ref_args, *f64), root)
    loss_bound, norm_bound, bound = fp32_bounds or (LOSS_BOUND64, NORM_BOUND64, BOUND64)
    ref = ref_ranks[0]
    for r in ranks:
        assert len(r["losses"]) == len(ref["losses"]) == int(STEPS)
        for step, (got, want) in enumerate(zip(r["losses"], ref["losses"])):
            for k in ("loss", "denoise_loss", "text_recon_loss"):
                assert abs(got[k] - want[k]) <= loss_bound * abs(want[k]), (
                    f"step {step} {k}: {got[k]!r} vs one process's {want[k]!r}, relative "
                    f"{abs(got[k] - want[k]) / max(abs(want[k]), 1e-300):.2e} > {loss_bound:.2e}")
        for step, (got, want) in enumerate(zip(r["grad_norms"], ref["grad_norms"])):
            assert abs(got - want) <= norm_bound * want, (
                f"step {step} gradient norm: relative {abs(got - want) / want:.2e} > {norm_bound:.2e}")
    assert params.keys() == ref_params.keys()
    p0 = ref["params0"]  # the same initial weights at any layout (full master weights, then TP split)
    for r in ranks:
        for k, v in r["params0"].items():
            assert torch.equal(v, p0[k]), k
    # Each tensor's update (weight decay keeps it non-zero), against the reference's update.
    worst = max((_rel(params[k] - p0[k], ref_params[k] - p0[k]), k) for k in ref_params)
    assert worst[0] <= bound, f"{worst[1]}: update {worst[0]:.2e} from one process's (relative) > {bound:.2e}"
    return ranks


PLAIN, MASK = (), ("--mask",)
RECON_LATE = ("--gamma", "0.5", "--target", "3")
RECON_0 = ("--gamma", "0.5", "--target", "0")
COSMAP = ("--weighting-scheme", "cosmap")  # diffusers' non-uniform per-sample loss weights
SQRT_X0 = ("--weighting-scheme", "sigma_sqrt", "--precondition-outputs")  # 1/t^2 weights, the x0 target
HIDDEN, MB, IMG, TXT = 64, 2, 12, 16  # tiny preset, 8x6 latents, micro batch 2


@pytest.mark.timeout(300)
@pytest.mark.slow  # TP=2 is in the sequence-parallel tests below (with recon, masks, padded text, PP)
def test_tp2(root):
    _compare(root, 2, ["--tp", "2"], PLAIN)


@pytest.mark.timeout(300)
def test_pp2_sends_exactly_the_plain_bytes(root):
    ranks = _compare(root, 2, ["--pp", "2"], PLAIN)
    sent = ranks[0]["sent"]
    assert sent and all(shape == (IMG + TXT + 1, MB, HIDDEN) for shape, _ in sent)
    assert all(nbytes == (IMG + TXT + 1) * MB * HIDDEN * 8 for _, nbytes in sent)


@pytest.mark.timeout(300)
def test_dp2_with_different_masks_weighted(root):
    _compare(root, 2, ["--mask", *COSMAP], (*MASK, *COSMAP))


@pytest.mark.slow  # TP x PP is covered by test_tp2_pp2_sequence_parallel_halves_the_message
@pytest.mark.timeout(400)
def test_tp2_pp2(root):
    _compare(root, 4, ["--tp", "2", "--pp", "2"], PLAIN)


@pytest.mark.timeout(300)
def test_pp2_uneven(root):
    _compare(root, 2, ["--pp", "2", "--pipeline-layers", "3,1"], PLAIN)


@pytest.mark.timeout(300)
def test_pp2_recon_target_on_second_stage_weighted_x0(root):
    ranks = _compare(root, 2, ["--pp", "2", *RECON_LATE, *SQRT_X0], (*RECON_LATE, *SQRT_X0))
    assert ranks[0]["losses"][0]["text_recon_loss"] > 0
    assert all(shape == (IMG + 2 * TXT + 1, MB, HIDDEN) for shape, _ in ranks[0]["sent"])


@pytest.mark.slow  # target 0 through PP: the SP test below; recon through PP: the target-3 test
@pytest.mark.timeout(300)
def test_pp2_recon_target_zero(root):
    ranks = _compare(root, 2, ["--pp", "2", *RECON_0], RECON_0)
    assert ranks[0]["losses"][0]["text_recon_loss"] > 0


@pytest.mark.timeout(300)
def test_pp2_interleaved_virtual_stages(root):
    """PP=2 x 2 virtual stages (one block per model chunk): megatron's interleaved 1F1B."""
    _compare(root, 2, ["--pp", "2", "--vpp", "2", *RECON_LATE], RECON_LATE)


SP = ("--tp", "2", "--sequence-parallel")


@pytest.mark.slow  # the next test runs the same layout with recon, masks and padded text
@pytest.mark.timeout(300)
def test_tp2_sequence_parallel(root):
    _compare(root, 2, list(SP), PLAIN)


@pytest.mark.timeout(300)
def test_tp2_sequence_parallel_recon_target_zero_with_masks_and_padded_text(root):
    """Text of 13 tokens padded to 15 (the FP8 padding), then to 16 for the split over TP=2;
    the pads stay out of the attention. Text reconstruction on, its target the embedded text."""
    text = ("--text-len", "13", "--text-pad-multiple", "5")
    _compare(root, 2, [*SP, *RECON_0, *text, "--mask"], (*RECON_0, *text, "--mask"))


@pytest.mark.timeout(500)
def test_tp2_pp2_sequence_parallel_halves_the_message(root):
    """TP=2 x PP=2 with sequence parallelism and gamma > 0: each rank sends its half of the
    image, text and target tokens, plus the replicated y: (12 + 2 * 16) / 2 + 1 = 23 tokens
    instead of the 45 of the same run without sequence parallelism."""
    ranks = _compare(root, 4, [*SP, "--pp", "2", *RECON_LATE], RECON_LATE)
    plain = IMG + 2 * TXT + 1
    half = (IMG + 2 * TXT) // 2 + 1
    for r in ranks:
        if r["sent"]:
            assert all(shape == (half, MB, HIDDEN) for shape, _ in r["sent"]), r["sent"]
            assert all(nbytes == half * MB * HIDDEN * 8 for _, nbytes in r["sent"])
    assert sum(bool(r["sent"]) for r in ranks) == 2  # both TP ranks of the first stage send
    assert 2 * (half - 1) == plain - 1


@pytest.mark.timeout(300)
def test_dp2_distributed_optimizer_overlapped_in_small_buckets_is_plain_dp2_to_the_bit(root):
    """DP=2, distributed optimizer with overlapped grad reduce-scatter and param all-gather
    (megatron's forward pre-hooks), several DDP buckets, against plain DDP at DP=2 (which
    test_dp2_with_different_masks_weighted holds to one process in float64). megatron-core's
    distributed optimizer is fp32 only (it copies the gradients to its shards with ``.float()``),
    so this runs in fp32, and to the bit: a reduce-scatter adds each element's two DP halves
    as the all-reduce does, and Adam on a shard is Adam on the same elements. The gradient norm
    is summed in shards, then over DP: a different order (the norm stays below the clip, so
    it changes no update); it is held to its own sum's fp32 rounding, N_PARAMS * u / 2."""
    from _bounds import N_PARAMS, U32

    dist = ["--mask", *COSMAP, "--overlap", "--bucket-size", "3000"]
    ranks = _compare(root, 2, dist, ["--mask", *COSMAP], ref_nproc=2, fp32_bounds=(0, N_PARAMS * U32 / 2, 0))
    assert ranks[0]["buckets"] > 2, ranks[0]["buckets"]
    assert ranks[0]["param_gather_pre_hooks"]


# Context parallelism (models/context_parallel.py): each CP rank holds half of the 12 image
# tokens and the whole text; the attention is an all-to-all over the heads (Ulysses).
CP2 = ("--cp", "2")


@pytest.mark.slow  # CP=2 x TP=2 + SP runs the same arguments; CP=2 x DP=2 the masks per DP rank
@pytest.mark.timeout(300)
def test_cp2_recon_target_zero_with_masks(root):
    ranks = _compare(root, 2, [*CP2, *RECON_0, "--mask"], (*RECON_0, "--mask"))
    assert ranks[0]["losses"][0]["text_recon_loss"] > 0


@pytest.mark.timeout(400)
def test_cp2_dp2_with_masks(root):
    """CP=2 x DP=2: the gradients all-reduced over data x context parallel (the CP-aware groups);
    different masks per data-parallel rank; gamma 0 (the CP cases below have text reconstruction on)."""
    ranks = _compare(root, 4, [*CP2, "--mask"], MASK)
    assert all(step["text_recon_loss"] == 0 for step in ranks[0]["losses"])


@pytest.mark.slow  # the distributed optimizer's own test at DP=2 is in the default suite
@pytest.mark.timeout(400)
def test_cp2_dp2_distributed_optimizer_overlapped_is_plain_cp2_dp2(root):
    """CP=2 x DP=2: megatron's distributed optimizer shards over data x context parallel, with
    overlapped grad reduce-scatter and param all-gather: plain DDP's numbers in fp32 (the
    distributed optimizer is fp32 only), within the fp32 layout bound: over 4 ranks gloo's
    reduce-scatter and all-reduce add the four parts of a gradient in different orders."""
    from _bounds import BOUND

    ranks = _compare(root, 4, [*CP2, "--mask", "--overlap", "--bucket-size", "3000"], [*CP2, "--mask"], ref_nproc=4,
                     fp32_bounds=(BOUND, BOUND, BOUND))
    assert ranks[0]["buckets"] > 2, ranks[0]["buckets"]


@pytest.mark.timeout(500)
def test_cp2_pp2_recompute_full_sends_the_image_chunk_and_the_whole_text(root):
    """CP=2 x PP=2 with --recompute-granularity full (uniform, one block per unit: the blocks run
    again in the backward pass, all-to-alls included), text reconstruction with its target on
    the second stage: each rank sends its 6 of the 12 image tokens, the whole text and target,
    and y: 6 + 2 * 16 + 1 = 39 tokens."""
    ranks = _compare(root, 4, [*CP2, "--pp", "2", "--recompute", *RECON_LATE], RECON_LATE)
    tokens = IMG // 2 + 2 * TXT + 1
    senders = [r for r in ranks if r["sent"]]
    assert len(senders) == 2  # both CP ranks of the first stage
    for r in senders:
        assert all(shape == (tokens, MB, HIDDEN) and nbytes == tokens * MB * HIDDEN * 8
                   for shape, nbytes in r["sent"]), r["sent"]


@pytest.mark.timeout(500)
def test_cp2_tp2_sequence_parallel(root):
    """CP=2 x TP=2 with sequence parallelism: each image chunk sliced again over TP, the text
    sliced over TP and whole over CP; heads split over TP, then over CP by the all-to-all."""
    _compare(root, 4, [*CP2, *SP, *RECON_0, "--mask"], (*RECON_0, "--mask"))



@pytest.mark.slow  # CP x PP is in the default suite (test_cp2_pp2_...); interleaving adds model chunks
@pytest.mark.timeout(500)
def test_cp2_pp2_interleaved_virtual_stages(root):
    _compare(root, 4, [*CP2, "--pp", "2", "--vpp", "2", *RECON_LATE], RECON_LATE)
