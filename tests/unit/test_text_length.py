"""Text length: a single-stage model takes any number of text tokens, like diffusers'
SD3Transformer2DModel; a pipeline stage needs the declared ``text_seq_len`` and says so."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402

from megatron_sd3.convert import sd3_from_diffusers  # noqa: E402

COMMON = dict(sample_size=16, patch_size=2, in_channels=16, attention_head_dim=16, num_attention_heads=4,
              joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=24, out_channels=16,
              pos_embed_max_size=24, num_layers=2, qk_norm="rms_norm", dual_attention_layers=(0,))


def _diffusers():
    torch.manual_seed(0)
    d = SD3Transformer2DModel(**COMMON).eval()
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0, 0.1)
    return d


def _inputs(n_text, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, n_text, 32, generator=g),
                pooled_projections=torch.randn(2, 24, generator=g), timestep=torch.tensor([10.0, 700.0]))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_any_text_length_like_diffusers(single_process):
    d = _diffusers()
    ours = sd3_from_diffusers(d).eval()  # declared text_seq_len: 333
    assert ours.config.text_seq_len == 333
    for n in (77, 333, 5):
        x = _inputs(n)
        with torch.no_grad():
            assert _rel(ours(**x), d(**x).sample) <= 1e-5, n


def test_any_text_length_with_padding_and_text_recon(single_process):
    d = _diffusers()
    kw = dict(num_layers=1, text_recon_gamma=0.5, text_recon_target_layer=0)  # the first block keeps its text
    plain = sd3_from_diffusers(d, **kw).eval()
    padded = sd3_from_diffusers(d, **kw).eval()
    padded.config.text_pad_multiple = 16  # what FP8 sets: the text stream travels padded to 80
    x = _inputs(77)
    with torch.no_grad():
        v, final, target = plain(**x)
        vp, final_p, target_p = padded(**x)
    assert padded.layout((8, 8), 77).n_txt == 80
    assert final.shape == target.shape == (2, 77, 64) and final_p.shape == (2, 77, 64)
    assert _rel(vp, v) <= 1e-5 and _rel(final_p, final) <= 1e-5 and _rel(target_p, target) <= 1e-5


def test_pipeline_stage_needs_the_declared_length(single_process):
    from megatron_sd3.config import make_config
    from megatron_sd3.models.sd3_model import SD3Model

    # (a first stage of a one-rank world holds every block: the recon target keeps the last one's text)
    cfg = make_config("tiny", text_recon_gamma=0.5, text_recon_target_layer=1)
    first = SD3Model(cfg, pre_process=True, post_process=False)
    x = dict(hidden_states=torch.randn(1, cfg.in_channels, 8, 8),
             pooled_projections=torch.randn(1, cfg.pooled_projection_dim), timestep=torch.tensor([5.0]))
    with pytest.raises(ValueError, match=rf"text has 7 tokens but pipeline stages exchange activations of "
                                         rf"the declared text_seq_len={cfg.text_seq_len}; set \[model\] "
                                         rf"text_seq_len = 7"):
        first(encoder_hidden_states=torch.randn(1, 7, cfg.joint_attention_dim), **x)
    out = first(encoder_hidden_states=torch.randn(1, cfg.text_seq_len, cfg.joint_attention_dim), **x)
    assert out.shape[0] == first.layout((8, 8)).seq_len
