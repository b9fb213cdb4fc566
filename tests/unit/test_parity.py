"""diffusers' SD3Transformer2DModel is the numerical reference (fp32, rel. error <= 1e-5)."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402

from megatron_sd3.convert import sd3_from_diffusers, sd3_to_diffusers_state_dict  # noqa: E402

COMMON = dict(sample_size=16, patch_size=2, in_channels=16, attention_head_dim=16, num_attention_heads=4,
              joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=24, out_channels=16,
              pos_embed_max_size=24)
LAYOUTS = {
    "sd3_medium_like": dict(num_layers=3, qk_norm=None, dual_attention_layers=()),
    "sd35_medium_like": dict(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}


def _random_diffusers(seed=0, **kw):
    torch.manual_seed(seed)
    d = SD3Transformer2DModel(**{**COMMON, **kw}).eval()
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0, 0.1)
    return d


def _inputs(h=12, w=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 16, h, w, generator=g),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
                pooled_projections=torch.randn(2, 24, generator=g), timestep=torch.tensor([10.0, 700.0]))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parity_full_model_and_exact_round_trip(single_process, name):
    d = _random_diffusers(**LAYOUTS[name])
    ours = sd3_from_diffusers(d, text_seq_len=7).eval()
    for h, w in [(12, 8), (6, 14), (48, 48)]:  # non-square, and the largest the table allows
        x = _inputs(h, w)
        with torch.no_grad():
            assert _rel(ours(**x), d(**x).sample) <= 1e-5
    back = sd3_to_diffusers_state_dict(ours)
    ref = d.state_dict()
    assert back.keys() == ref.keys()
    assert all(torch.equal(back[k], ref[k]) for k in ref), "round trip must be exact"


def test_truncated_sd3_light_like(single_process, tmp_path):
    """First 2 of 4 SD3.5-like blocks, from a save_pretrained directory; export loads strictly."""
    d = _random_diffusers(num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1, 2))
    d.save_pretrained(tmp_path / "base")
    ours = sd3_from_diffusers(str(tmp_path / "base"), num_layers=2, text_seq_len=7).eval()
    cfg = ours.config
    assert cfg.num_layers == 2 and not cfg.context_pre_only_last and cfg.dual_attention_layers == (0, 1)
    # reference: diffusers' own forward over the first two blocks with the last keeping its text
    x = _inputs()
    with torch.no_grad():
        hs = d.pos_embed(x["hidden_states"])
        temb = d.time_text_embed(x["timestep"], x["pooled_projections"])
        enc = d.context_embedder(x["encoder_hidden_states"])
        for blk in d.transformer_blocks[:2]:
            enc, hs = blk(hidden_states=hs, encoder_hidden_states=enc, temb=temb)
        hs = d.proj_out(d.norm_out(hs, temb))
        ref = hs.reshape(2, 6, 4, 2, 2, 16).permute(0, 5, 1, 3, 2, 4).reshape(2, 16, 12, 8)
        out = ours(**x)
    assert _rel(out, ref) <= 1e-5
    # export: a 2-block diffusers model (last block context_pre_only) with the same velocity
    exported = SD3Transformer2DModel(**{**d.config, "num_layers": 2})
    exported.load_state_dict(sd3_to_diffusers_state_dict(ours), strict=True)
    with torch.no_grad():
        assert _rel(out, exported(**x).sample) <= 1e-5


def test_latent_larger_than_table_is_a_clear_error(single_process):
    ours = sd3_from_diffusers(_random_diffusers(**LAYOUTS["sd3_medium_like"]), text_seq_len=7)
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size=24"):
        ours(**_inputs(50, 8))
