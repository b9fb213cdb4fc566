import pytest

from megatron_sd3.config import ConfigError, make_config, model_config_from_toml, model_fields


def _toml(tmp_path, body):
    p = tmp_path / "c.toml"
    p.write_text(body)
    return p


def test_seed_toml_section(tmp_path):
    f = model_config_from_toml(_toml(tmp_path, "[model]\ntext_recon_gamma = 0.5\ntext_recon_target_layer = 0\n"))
    assert f == {"preset": "tiny", "text_recon_gamma": 0.5, "text_recon_target_layer": 0}


@pytest.mark.parametrize("body, match", [
    ("[model]\ntext_recon_gama = 0.5\n", "unknown key 'text_recon_gama'.*did you mean 'text_recon_gamma'"),
    ("[model]\nnum_layers = '15'\n", "'num_layers' must be int, got str"),
    ("[model]\nqk_norm = 1\n", "'qk_norm' must be bool"),
    ("[model]\nnum_layers = true\n", "'num_layers' must be int, got bool"),
    ("[model]\ntext_recon_gamma = -1.0\n", "must be >= 0"),
    ("[model]\nhidden_size = 0\n", "must be > 0"),
    ("[model]\npreset = 'sd3_lite'\n", "did you mean 'sd3_light'"),
    ("[model\n", "not valid TOML"),
])
def test_bad_toml_names_the_key(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match):
        model_config_from_toml(_toml(tmp_path, body))


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        model_config_from_toml("/nonexistent/x.toml")


def test_target_layer_rules():
    model_fields("tiny", text_recon_gamma=0.5, text_recon_target_layer=3)
    with pytest.raises(ConfigError, match="text_recon_target_layer = 4 gives no meaningful target"):
        model_fields("tiny", text_recon_gamma=0.5, text_recon_target_layer=4)
    with pytest.raises(ConfigError, match="needs a last block with a text stream"):
        model_fields("sd35_medium", text_recon_gamma=0.5)
    model_fields("tiny", text_recon_target_layer=9)  # irrelevant while gamma = 0
    with pytest.raises(ConfigError, match="dual_attention_layers"):
        model_fields("tiny", dual_attention_layers=[7])
    # fewer blocks than the preset: its first N, with the dual attention they had; an explicit
    # list still has to fit
    assert model_fields("sd3_light", num_layers=2)["dual_attention_layers"] == (0, 1)
    assert model_fields("sd3_light", num_layers=14)["dual_attention_layers"] == tuple(range(13))
    with pytest.raises(ConfigError, match="dual_attention_layers"):
        model_fields("sd3_light", num_layers=2, dual_attention_layers=[5])


def test_presets_build_configs():
    cfg = make_config("sd3_light")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.kv_channels) == (15, 1536, 24, 64)
    assert cfg.qk_norm and cfg.dual_attention_layers == tuple(range(13)) and not cfg.context_pre_only_last
    assert (cfg.text_seq_len, cfg.joint_attention_dim, cfg.pooled_projection_dim) == (333, 4096, 2048)
    assert cfg.pos_embed_max_size == 384 and cfg.ffn_hidden_size == 4 * 1536
    assert make_config("sd3_medium").context_pre_only_last
    assert make_config("sd35_large").hidden_size == 2432
    assert make_config("sd3_light", parallel={"text_pad_multiple": 16}).padded_text_len == 336
