"""The seed specification's minimal check of the text-reconstruction loss, verbatim apart from the
import (docs/design.md, section "Text reconstruction")."""
import torch
from megatron_sd3.models.sd3_light import LightSD3Pipeline


def test_seed_minimal_check():
    # 构造一个“未初始化”的 pipeline 实例，仅用于获取 loss_fn
    pipe = LightSD3Pipeline.__new__(LightSD3Pipeline)
    pipe.config = {}
    pipe.model_config = {"text_recon_gamma": 0.5, "text_recon_target_layer": 0}

    loss_fn = pipe.get_loss_fn()

    pred = torch.tensor([1.0, 2.0])
    target = torch.zeros_like(pred)
    mask = torch.tensor([])

    final_tokens = torch.tensor([[1.0, 1.0]])
    target_tokens = torch.tensor([[0.0, 0.0]])

    loss = loss_fn((pred, final_tokens, target_tokens), (target, mask))

    # 期望：base MSE (=2.5) + 0.5 * text MSE (=1.0)
    expected = torch.mean((pred - target) ** 2) + 0.5 * torch.mean((final_tokens - target_tokens) ** 2)
    assert torch.allclose(loss, expected)
