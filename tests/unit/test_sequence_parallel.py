"""Sequence parallelism without process groups: the pipeline message layout, the padding of the
streams, the flag checks. (TP=2 + SP against one process, also with PP=2 and gamma > 0, is in
tests/multiprocess/test_parallel.py.)"""
import pytest
import torch

from megatron_sd3.config import ConfigError, make_config
from megatron_sd3.models import sequence_parallel as sp
from megatron_sd3.models.packing import ActivationLayout


def test_message_holds_this_ranks_slices_and_the_replicated_y():
    plain = ActivationLayout(n_img=12, n_txt=16, carry_target=True)
    split = ActivationLayout(n_img=12, n_txt=16, carry_target=True, sp=2)
    assert plain.seq_len == plain.local_len == 12 + 2 * 16 + 1
    assert split.local_len == (12 + 2 * 16) // 2 + 1 and split.seq_len == 2 * split.local_len
    assert split.seq_len // 2 == split.local_len  # megatron's p2p shape: seq_length // TP
    assert split.bytes_per_message(2, 64, torch.float32) == split.local_len * 2 * 64 * 4
    x, c, t, y = torch.randn(6, 2, 8), torch.randn(8, 2, 8), torch.randn(8, 2, 8), torch.randn(2, 8)
    msg = split.pack(x, c, t, y)
    assert msg.shape == (split.local_len, 2, 8)
    x2, c2, t2, y2 = split.unpack(msg)
    assert torch.equal(x2, x) and torch.equal(c2, c) and torch.equal(t2, t) and torch.equal(y2, y)
    with pytest.raises(ValueError, match="layout expects 23"):
        split.unpack(torch.zeros(45, 2, 8))


def test_text_is_padded_to_a_multiple_of_tp_on_top_of_the_fp8_padding():
    cfg = make_config("tiny", text_seq_len=13, parallel=dict(text_pad_multiple=5))
    assert sp.size(cfg) == 1 and sp.text_len(cfg) == 15
    cfg.tensor_model_parallel_size, cfg.sequence_parallel = 2, True  # as a TP=2 run's config says
    assert sp.size(cfg) == 2 and sp.text_len(cfg) == 16
    sp.check_image_tokens(cfg, 12)
    with pytest.raises(ConfigError, match="does not divide them"):
        sp.check_image_tokens(cfg, 9)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra, message", [
    (["--sequence-parallel"], "--sequence-parallel splits the sequence over the tensor-parallel ranks"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--fp8-format", "hybrid"],
     "--sequence-parallel with FP8 needs --transformer-impl transformer_engine"),
])
def test_bad_sequence_parallel_flags_are_one_line(extra, message, capsys):
    from test_pretrain import _main

    code, err = _main(["--config", "configs/sd3_light_tiny.toml", "--train-iters", "8", *extra], capsys)
    assert code == 2 and message in err, err
