"""The EMA (megatron_sd3/training/ema.py): diffusers' EMAModel decay schedule and update, computed
from the optimizer's fp32 master weights (Float16 optimizer and the DP-sharded distributed
optimizer, tests/_ema_worker.py under DP=2), checkpoint round trip across EMA kinds."""
import pytest
import torch

from _ranks import run_ranks
from megatron_sd3.training.ema import EMA


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))


@pytest.mark.parametrize("warmup, kwargs", [("ratio", {}), ("power", {"use_ema_warmup": True}),
                                            ("power", {"use_ema_warmup": True, "inv_gamma": 3.0, "power": 0.75})])
def test_decay_and_update_match_diffusers_ema_model(warmup, kwargs):
    from diffusers.training_utils import EMAModel

    model = _model()
    ours = EMA([model], 0.9, warmup=warmup, inv_gamma=kwargs.get("inv_gamma", 1.0),
               power=kwargs.get("power", 2 / 3))
    theirs = EMAModel(model.parameters(), decay=0.9, foreach=True, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for it in range(1, 30):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
        ours.update(it)
        theirs.step(model.parameters())
        assert ours.decay_at(it) == theirs.cur_decay_value, it
        for s, (n, _) in zip(theirs.shadow_params, model.named_parameters()):
            assert torch.equal(ours.shadow[0][n], s), (it, n)
    assert ours.decay_at(1) == 0.0 < ours.decay_at(2) < ours.decay_at(29) <= 0.9  # a warmup, capped
    assert ours.decay_at(10 ** 6) == 0.9


def test_constant_decay_and_interval():
    model = _model()
    ema = EMA([model], 0.5, interval=2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(1)  # not an update iteration
    assert all(torch.equal(ema.shadow[0][n], start[n]) for n in start)
    ema.update(2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[0][n], start[n] + 0.5, rtol=0, atol=1e-6)
    assert ema.decay_at(2) == 0.5


def test_unknown_warmup_is_refused():
    with pytest.raises(ValueError, match="EMA warmup 'cosine'"):
        EMA([_model()], 0.9, warmup="cosine")


@pytest.mark.parametrize("case", [pytest.param("float16", marks=pytest.mark.slow), "distopt"])  # distopt: the harder case
def test_ema_of_fp32_master_weights_under_dp2(case, tmp_path):
    logs = run_ranks("tests/_ema_worker.py", 2, ["--case", case, "--out", str(tmp_path)], timeout=600)
    for r, log in enumerate(logs):
        assert f"EMA_WORKER_OK rank={r} case={case}" in log, log[-2000:]
