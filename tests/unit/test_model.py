import os

import pytest
import torch

from megatron_sd3.config import make_config
from megatron_sd3.backends.transformer_engine import transformer_engine_available
from megatron_sd3.models.mmdit_layer_specs import get_mmdit_layer_spec
from megatron_sd3.models.sd3_model import SD3Model


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(b, cfg.in_channels, 8, 6, generator=g),
                encoder_hidden_states=torch.randn(b, cfg.text_seq_len, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(b, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([100.0, 900.0][:b]))


def _model(**kw):
    parallel = kw.pop("parallel", {})
    return SD3Model(make_config("tiny", zero_init_adaln=False, parallel=parallel, **kw))


def test_gamma_zero_returns_velocity_only(single_process):
    m = _model()
    out = m(**_batch(m.config))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 16, 8, 6)
    # the last block's unused text output is neither computed nor trained
    last = m.blocks[-1]
    assert not last.text_output
    assert not any(p.requires_grad for p in last.context_mlp.parameters())


@pytest.mark.parametrize("k", [0, 2])
def test_text_recon_outputs_and_target_capture(single_process, k):
    plain = _model()
    m = _model(text_recon_gamma=0.5, text_recon_target_layer=k)
    batch = _batch(m.config)
    vel, final, target = m(**batch)
    assert torch.equal(vel, plain(**batch)), "gamma must not change the velocity"
    assert final.shape == target.shape == (2, 16, 64)
    assert final.requires_grad and not target.requires_grad
    # the target is what block k outputs (or the embedded text for k = 0)
    with torch.no_grad():
        x, c, y = m.embeddings(batch["hidden_states"], batch["encoder_hidden_states"],
                               batch["pooled_projections"], batch["timestep"])
        for blk in m.blocks[:k]:
            x, c = blk(x, c, y)
    assert torch.allclose(target, c.transpose(0, 1))


def test_same_weights_whatever_is_built(single_process):
    a, b = _model(), _model(text_recon_gamma=0.5)
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = SD3Model(make_config("tiny", zero_init_adaln=False, init_seed=7))
    assert not torch.equal(dict(c.named_parameters())["blocks.0.attention.linear_qkv.weight"], sa["blocks.0.attention.linear_qkv.weight"])


def test_text_padding_changes_nothing(single_process):
    m = _model(text_recon_gamma=0.5, text_recon_target_layer=1)
    padded = _model(text_recon_gamma=0.5, text_recon_target_layer=1, parallel={"text_pad_multiple": 24})
    assert padded.config.padded_text_len == 24
    batch = _batch(m.config)
    for a, b in zip(m(**batch), padded(**batch)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_text_pads_stay_out_of_attention_without_a_mask(single_process, monkeypatch):
    """Padded text: every joint attention runs over [image | real text] with no mask (so the
    fused flash/cuDNN kernels stay usable); the pads get a zero attention output."""
    import torch.nn.functional as F

    m = _model(text_recon_gamma=0.5, parallel={"text_pad_multiple": 24})
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[2], k.shape[2], attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    batch = _batch(m.config)
    m(**batch)
    n_img = m.config.num_image_tokens(8, 6)
    joint = [c for c in calls if c[1] != n_img]  # MMDiT-X's image-only attentions aside
    assert len(joint) == m.config.num_layers
    assert all(c == (n_img + 16, n_img + 16, None) for c in calls if c[1] != n_img), calls
    x, c, y = m.embeddings(*batch.values())
    c = torch.cat([c, c.new_zeros(8, *c.shape[1:])])
    _, c_attn = m.blocks[0].attention(x, c, text_len=16)
    assert c_attn.shape[0] == 24 and torch.all(c_attn[16:] == 0) and c_attn[:16].abs().sum() > 0


def test_attention_backend_picks_the_kernel(single_process):
    """Megatron's --attention-backend names map onto torch's SDPA kernels: same numbers from
    flash and unfused (math) as from auto; fused (cuDNN) has no CPU kernel and says so."""
    from megatron.core.transformer.enums import AttnBackend

    outs = {}
    for name in ("auto", "flash", "unfused", "fused"):
        m = _model(text_recon_gamma=0.5, parallel={"attention_backend": AttnBackend[name]})
        batch = _batch(m.config)
        if name == "fused" and not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="No viable backend|No available kernel"):
                m(**batch)
            continue
        outs[name] = m(**batch)
    for name in ("flash", "unfused"):
        for a, b in zip(outs[name], outs["auto"]):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_qk_norm_off_is_identity_op_in_the_spec(single_process):
    """megatron's idiom for an optional submodule: IdentityOp in the spec, no branch in the module."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    off = get_mmdit_layer_spec("local", qk_norm=False).submodules.joint_attention.submodules
    on = get_mmdit_layer_spec("local", qk_norm=True).submodules.joint_attention.submodules
    assert off.q_layernorm is IdentityOp and off.k_layernorm is IdentityOp
    assert on.q_layernorm is WrappedTorchNorm
    m = _model(qk_norm=False)
    att = m.blocks[0].attention
    assert isinstance(att.q_layernorm, IdentityOp) and isinstance(att.context_k_layernorm, IdentityOp)
    assert not any("layernorm" in name for name, _ in m.named_parameters())
    assert any("q_layernorm" in name for name, _ in _model(qk_norm=True).named_parameters())


def test_norm_epsilon_is_the_config_s(single_process):
    """Every norm of the model (adaLN, qk-norm, output head) reads config.layernorm_epsilon."""
    cfg = make_config("tiny", zero_init_adaln=False)
    cfg.layernorm_epsilon = 0.25
    m = SD3Model(cfg)
    batch = _batch(cfg)
    seen = []
    orig = torch.nn.functional.layer_norm

    def spy(t, shape, weight=None, bias=None, eps=1e-5):
        seen.append(eps)
        return orig(t, shape, weight, bias, eps)

    torch.nn.functional.layer_norm = spy
    try:
        m(**batch)
    finally:
        torch.nn.functional.layer_norm = orig
    assert len(seen) > cfg.num_layers and set(seen) == {0.25}, seen
    rms = {mod.eps for mod in m.modules() if isinstance(mod, torch.nn.RMSNorm)}
    assert rms == {0.25}


def test_compat_refuses_an_unsupported_megatron_core():
    from megatron_sd3 import compat

    compat.require_supported_megatron_core()  # the installed one
    with pytest.raises(RuntimeError) as err:
        compat.require_supported_megatron_core((0, 15, 2))
    msg = str(err.value)
    assert "\n" not in msg and "megatron-core 0.15.2 is not supported" in msg and "0.16.x" in msg


def test_te_attention_backend_env_is_megatron_s(monkeypatch):
    """--attention-backend onto TE's NVTE_* variables, by megatron's own mapping (compat.py)."""
    from megatron.core.transformer.enums import AttnBackend

    from megatron_sd3 import compat

    for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        monkeypatch.delenv(name, raising=False)
    compat.set_te_attention_backend(make_config("tiny", parallel={"attention_backend": AttnBackend.flash}))
    assert (os.environ["NVTE_FLASH_ATTN"], os.environ["NVTE_FUSED_ATTN"],
            os.environ["NVTE_UNFUSED_ATTN"]) == ("1", "0", "0")


def test_sharded_state_dict_keys_are_global(single_process):
    m = _model()
    sd = m.sharded_state_dict()
    assert sd["blocks.3.attention.linear_qkv.weight"].key == "blocks.3.attention.linear_qkv.weight"
    assert "head.proj_out.weight" in sd


@pytest.mark.skipif(transformer_engine_available(), reason="Transformer Engine is installed")
def test_transformer_engine_without_te_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs NVIDIA Transformer Engine"):
        get_mmdit_layer_spec("transformer_engine")


@pytest.mark.skipif(not transformer_engine_available(), reason="needs Transformer Engine")
def test_transformer_engine_spec_builds(single_process):
    spec = get_mmdit_layer_spec("transformer_engine")
    SD3Model(make_config("tiny"), layer_spec=spec)


def test_pipeline_message_sizes_for_sd3_light_at_1024px():
    """(S_img + S_txt + [S_txt if gamma > 0] + 1) x micro_batch x hidden x dtype size."""
    from megatron_sd3.models.packing import ActivationLayout

    cfg = make_config("sd3_light")
    n_img = cfg.num_image_tokens(128, 128)  # 1024 px -> 128x128 latent -> 64x64 patches
    off = ActivationLayout(n_img, cfg.padded_text_len, carry_target=False)
    on = ActivationLayout(n_img, cfg.padded_text_len, carry_target=True)
    assert (n_img, off.seq_len, on.seq_len) == (4096, 4430, 4763)
    assert off.bytes_per_message(1, cfg.hidden_size, torch.bfloat16) == 4430 * 1536 * 2 == 13_608_960
    assert on.bytes_per_message(1, cfg.hidden_size, torch.bfloat16) == 14_631_936
def test_the_memory_report_states_the_pipeline_message_per_rank_under_cp_and_sp():
    """Each CP rank sends its image chunk and the whole text (and target); SP slices both streams
    again (the 333 text tokens padded to 334): tokens x micro batch x hidden x 4 bytes (fp32)."""
    from megatron_sd3.memory import pipeline_message_line

    cfg = make_config("sd3_light", parallel=dict(context_parallel_size=2, pipeline_model_parallel_size=2),
                      text_recon_gamma=0.5)
    line = pipeline_message_line(cfg, (128, 128), 2)
    assert "2715 tokens (2048 image + 333 text + 333 target + 1 (y)) x 2 x 1536" in line, line
    assert line.endswith(f"= {2715 * 2 * 1536 * 4 / 2**20:.2f} MiB"), line
    cfg = make_config("sd3_light", parallel=dict(context_parallel_size=2, tensor_model_parallel_size=2,
                                                 sequence_parallel=True, pipeline_model_parallel_size=2),
                      text_recon_gamma=0.0)
    line = pipeline_message_line(cfg, (128, 128), 2)
    assert "1192 tokens (1024 image + 167 text + 1 (y)) x 2 x 1536" in line, line
    assert line.endswith(f"= {1192 * 2 * 1536 * 4 / 2**20:.2f} MiB"), line


