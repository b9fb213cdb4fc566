"""pretrain_sd3.py with megatron's distributed optimizer, overlapped: DP=2 with the gradient
reduce-scatter and the parameter all-gather overlapped (``--overlap-grad-reduce
--overlap-param-gather``) in small DDP buckets (``--ddp-bucket-size``) trains the numbers of the
plain distributed optimizer in the same buckets, checkpoints the same weights and EMA, and a
checkpoint saved mid-run resumes bit-exactly."""
import os

import pytest
import torch

from test_pretrain import _main, _train

BUCKETS = ["--use-distributed-optimizer", "--mock-with-mask", "--ddp-bucket-size", "3000",
           "--ema-decay", "0.9", "--ema-update-interval", "3"]  # EMA at 3, not at the save at 4
OVERLAP = [*BUCKETS, "--overlap-grad-reduce", "--overlap-param-gather"]


def _weights(ck, ema, step=None):
    from megatron_sd3 import sampling

    chunks, _, _ = sampling.build_inference_model(ck, ema=ema, ckpt_step=step)
    return {k: v.clone() for k, v in chunks[0].state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.timeout(900)
@pytest.mark.slow  # the default suite: test_parallel's overlapped buckets with the distributed optimizer
def test_overlapped_param_gather_checkpoints_and_resumes_bit_exact(tmp_path, single_process):
    tmp = str(tmp_path)
    ck_plain, ck = os.path.join(tmp, "ck_plain"), os.path.join(tmp, "ck")
    plain, _ = _train(tmp, "plain", 2, [*BUCKETS, "--train-iters", "4", "--save", ck_plain])
    # 6 iterations, saved at 4 (and 6): its first 4 against the plain run, its last 2 against the resume
    first, _ = _train(tmp, "first", 2, [*OVERLAP, "--train-iters", "6", "--save", ck, "--save-interval", "4"])
    for it in range(1, 5):
        assert first[it]["loss"] == plain[it]["loss"], (it, first[it], plain[it])
    # The saved weights (and EMA) are those of the step just taken, not the all-gather pending.
    for ema in (False, True):
        want, got = _weights(ck_plain, ema), _weights(ck, ema, 4)
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (ema, k)
    resumed, logs = _train(tmp, "resumed", 2, [*OVERLAP, "--train-iters", "6", "--load", ck, "--ckpt-step", "4"])
    assert "resumed from" in logs[0]
    for it in (5, 6):
        for k in ("loss", "denoise_loss", "grad_norm"):
            assert resumed[it][k] == first[it][k], (it, k, resumed[it][k], first[it][k])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra, message", [
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce"),
    (["--overlap-param-gather", "--use-distributed-optimizer"], "needs --use-distributed-optimizer and --overlap-grad-reduce"),
    (["--ddp-bucket-size", "0"], "--ddp-bucket-size"),
])
def test_bad_overlap_flags_are_one_line(extra, message, capsys):
    code, err = _main(["--config", "configs/sd3_light_tiny.toml", "--train-iters", "8", *extra], capsys)
    assert code == 2 and message in err, err
