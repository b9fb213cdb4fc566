import pytest
import torch

from megatron_sd3.loss import combine_local, denoise_terms, text_recon_terms
from megatron_sd3.models.sd3_light import LightSD3Pipeline


def test_plain_mse_when_gamma_zero():
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = combine_local(pred, target, torch.tensor([]))
    assert torch.allclose(out.total, ((pred - target) ** 2).mean())
    assert out.text_recon == 0


def test_mask_broadcasts_over_channels_and_divides_by_weight():
    pred, target = torch.randn(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    mask = torch.zeros(2, 3, 3)
    mask[0, 0, 0] = 1.0
    mask[1, 2, 2] = 0.5
    s, w = denoise_terms(pred, target, mask)
    expect_s = (pred[0, :, 0, 0] ** 2).sum() + 0.5 * (pred[1, :, 2, 2] ** 2).sum()
    assert torch.allclose(s, expect_s) and float(w) == pytest.approx(4 * 1.5)
    with pytest.raises(ValueError, match="does not broadcast"):
        denoise_terms(pred, target, torch.ones(2, 5, 5))


def test_pseudo_huber():
    pred, target = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    out = combine_local(pred, target, None, pseudo_huber_c=1.0)
    expect = ((torch.sqrt(torch.tensor([9.0, 16.0]) + 1) - 1)).mean()
    assert torch.allclose(out.total, expect)


def test_breakdown_and_detached_target():
    pred, target = torch.ones(1, 2), torch.zeros(1, 2)
    final = torch.full((1, 3, 2), 2.0, requires_grad=True)
    tgt = torch.zeros(1, 3, 2, requires_grad=True)
    out = combine_local((pred, final, tgt), target, None, gamma=0.25)
    assert out.as_dict() == pytest.approx({"loss": 1 + 0.25 * 4, "denoise_loss": 1.0, "text_recon_loss": 4.0})
    out.total.backward()
    assert final.grad is not None and tgt.grad is None
    s, n = text_recon_terms(final, tgt)
    assert float(s) == 24.0 and float(n) == 6


def test_pipeline_rejects_bad_model_config():
    pipe = LightSD3Pipeline(model_config={"text_recon_gama": 0.5})
    with pytest.raises(ValueError, match="did you mean 'text_recon_gamma'"):
        pipe.get_loss_fn()
