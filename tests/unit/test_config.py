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


# ---- the run configuration: declared once (megatron_sd3.arguments.SECTIONS) -------------------

from megatron_sd3 import arguments  # noqa: E402
from megatron_sd3.config import MODEL_FIELDS, Field, at_least  # noqa: E402

TINY = "configs/sd3_light_tiny.toml"


def _parse(argv, capsys=None):
    """parse_args, or (exit code, stderr) when it refuses."""
    try:
        return arguments.parse_args(argv)
    except SystemExit as e:
        return e.code, capsys.readouterr().err if capsys else ""


def test_a_new_field_is_one_declaration(tmp_path, monkeypatch, capsys):
    """One Field in a section gives its flag, its TOML key (checked) and its effective-config entry."""
    t = arguments.SECTIONS["training"]
    knob = Field("warmup_knob", int, 3, "a setting added in one line", check=at_least(1))
    monkeypatch.setitem(arguments.SECTIONS, "training",
                        arguments.Section(t.name, t.title, [*t.fields, knob]))
    assert "--warmup-knob" in arguments.build_parser().format_help()
    assert _parse(["--mock-data"]).warmup_knob == 3
    assert _parse(["--mock-data", "--warmup-knob", "5"]).warmup_knob == 5
    cfg = _toml(tmp_path, "[training]\nwarmup_knob = 7\n")
    args = _parse(["--config", str(cfg), "--mock-data"])
    assert args.warmup_knob == 7 and arguments.effective_config(args)["warmup_knob"] == 7
    assert _parse(["--config", str(cfg), "--mock-data", "--warmup-knob", "9"]).warmup_knob == 9
    for body, message in [("[training]\nwarmup_knb = 7\n", "unknown key 'warmup_knb' (did you mean 'warmup_knob'?)"),
                          ("[training]\nwarmup_knob = 'x'\n", "'warmup_knob' must be int, got str"),
                          ("[training]\nwarmup_knob = 0\n", "'warmup_knob' must be >= 1, got 0"),
                          ("[parallel]\nwarmup_knob = 2\n", "[parallel]: unknown key 'warmup_knob'")]:
        code, err = _parse(["--config", str(_toml(tmp_path, body)), "--mock-data"], capsys)
        assert code == 2 and message in err, err
    code, err = _parse(["--mock-data", "--warmup-knob", "0"], capsys)
    assert code == 2 and "--warmup-knob must be >= 1, got 0" in err


def test_every_model_key_has_a_flag(tmp_path):
    """[model] keys and flags are the same declarations; a flag lands in args.model like the key."""
    parser_help = arguments.build_parser().format_help()
    values = {bool: True, int: 3, float: 0.25, list: [0, 1], str: "sd3_light"}
    for f in MODEL_FIELDS:
        assert f.flag in parser_help, f.flag
        v = values[f.type]
        if f.type is bool:
            argv = [f.flag]
        elif f.type is list:
            argv = [f.flag, *map(str, v)]
        else:
            argv = [f.flag, str(v)]
        args = _parse(["--mock-data", *argv])
        assert args.model[f.name] == (tuple(v) if f.type is list else v), f.name
        assert model_config_from_toml(_toml(tmp_path, f"[model]\n{f.name} = {str(v).lower() if f.type is bool else repr(v)}\n"))[f.name] \
            == args.model[f.name]
    assert _parse(["--config", TINY, "--no-qk-norm"]).model["qk_norm"] is False
    assert _parse(["--config", TINY, "--num-layers", "2"]).model == {
        "preset": "tiny", "zero_init_adaln": False, "text_recon_gamma": 0.5, "text_recon_target_layer": 0,
        "num_layers": 2}
    assert set(arguments.effective_config(_parse(["--mock-data"]))["model"]) == {"preset"}


def test_precedence_and_sections(tmp_path, capsys):
    """defaults < TOML < command line, for values and booleans; [backend] holds the kernels,
    [fp8] the FP8 settings."""
    cfg = _toml(tmp_path, "[training]\nlr = 1e-3\nbf16 = true\n[backend]\ntorch_compile = true\n"
                          "attention_backend = 'flash'\n[fp8]\nfp8_format = 'hybrid'\n")
    args = _parse(["--config", str(cfg), "--mock-data"])
    assert (args.lr, args.bf16, args.torch_compile, args.attention_backend, args.fp8_format) == \
        (1e-3, True, True, "flash", "hybrid")
    args = _parse(["--config", str(cfg), "--mock-data", "--lr", "2e-3", "--no-bf16", "--no-torch-compile"])
    assert (args.lr, args.bf16, args.torch_compile) == (2e-3, False, False)
    assert _parse(["--mock-data"]).lr == 1e-4
    assert {f.name for f in arguments.SECTIONS["backend"].fields} == {
        "transformer_impl", "attention_backend", "torch_compile", "torch_compile_mode",
        "cuda_graph_impl"}
    code, err = _parse(["--config", str(_toml(tmp_path, "[fp8]\ntorch_compile = true\n")), "--mock-data"], capsys)
    assert code == 2 and "[fp8]: unknown key 'torch_compile'" in err
    code, err = _parse(["--config", str(_toml(tmp_path, "[backend]\nattention_backend = 'flahs'\n")),
                        "--mock-data"], capsys)
    assert code == 2 and "did you mean 'flash'" in err
    # names are unique across sections: one flag, one key
    names = [f.name for s in arguments.SECTIONS.values() for f in s.fields]
    assert len(names) == len(set(names))


def test_command_line_data_source_replaces_the_tomls(tmp_path, capsys):
    """The tiny preset says mock_data = true; --data-path on the command line wins (and the other
    way round), while two sources given together are still refused."""
    args = _parse(["--config", TINY, "--data-path", str(tmp_path)])
    assert (args.data_path, args.data_blend, args.mock_data) == ((str(tmp_path),), [(1.0, str(tmp_path))], False)
    cfg = _toml(tmp_path, f"[data]\ndata_path = '{tmp_path} x'\n")  # one path (a space is part of it)
    assert _parse(["--config", str(cfg)]).data_blend == [(1.0, f"{tmp_path} x")]
    blend = _toml(tmp_path, "[data]\ndata_path = [0.6, 'A', 0.4, 'B']\n[evaluation]\nvalid_data_path = ['1', 'V']\n")
    args = _parse(["--config", str(blend)])
    assert (args.data_blend, args.valid_blend) == ([(0.6, "A"), (0.4, "B")], [(1.0, "V")])
    args = _parse(["--config", TINY, "--data-path", "3", "A", "1", "B"])
    assert args.data_blend == [(0.75, "A"), (0.25, "B")]
    code, err = _parse(["--config", TINY, "--data-path", "0.7", "A", "B"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "pretrain_sd3.py: error: --data-path 0.7 A B: give one directory, or weight-path pairs "
        "(e.g. --data-path 0.7 A 0.3 B)"]
    args = _parse(["--config", str(cfg), "--mock-data"])
    assert (args.data_path, args.mock_data) == (None, True)
    code, err = _parse(["--config", TINY, "--data-path", "x", "--mock-data"], capsys)
    assert code == 2 and "exactly one data source" in err
    both = _toml(tmp_path, f"[data]\ndata_path = '{tmp_path}'\nmock_data = true\n")
    code, err = _parse(["--config", str(both)], capsys)
    assert code == 2 and "exactly one data source" in err


@pytest.mark.parametrize("argv, message", [
    (["--train-iter", "4"], "unrecognized arguments: --train-iter (did you mean --train-iters?)"),
    (["--text-recon-gama=0.5"], "unrecognized arguments: --text-recon-gama=0.5 (did you mean --text-recon-gamma?)"),
    (["--train-iters", "four"], "argument --train-iters: invalid int value: 'four'"),
    (["--lr-decay-style", "cosin"], "--lr-decay-style must be one of constant, linear, cosine"),
    (["--preset", "sd3_lite"], "did you mean 'sd3_light'"),
    (["--num-layers", "0"], "--num-layers must be > 0, got 0"),
    (["--ema-decay", "1.0"], "--ema-decay must be in [0, 1) (0 = off), got 1.0"),
    (["--mock-task", "compositional", "--mock-classes", "4"], "--mock-task compositional and --mock-classes 4 "
     "are two tasks; give one"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    code, err = _parse(["--mock-data", *argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert "usage:" not in err
