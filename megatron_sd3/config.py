"""The model configuration: one object, built on megatron-core's ``TransformerConfig``.

``SD3Config`` adds the MMDiT fields (patching, text and pooled widths, qk-norm, MMDiT-X dual
attention, ``context_pre_only`` last block) and the seed's loss fields (``text_recon_gamma``,
``text_recon_target_layer``, ``pseudo_huber_c``) to megatron-core's transformer config, so the
parallel layers, schedules and DDP read the same object the model does.

``PRESETS`` holds the layouts: ``tiny`` (CPU demo and tests), ``sd3_light`` (the origin's model:
the first 15 joint blocks of SD3.5-medium, keeping the last block's text stream) and the full
``sd3_medium`` / ``sd35_medium`` / ``sd35_large`` layouts used for weight conversion.

``model_config_from_toml`` reads the ``[model]`` section of a TOML preset; every key is checked
(unknown keys with a close-match hint, types, ranges) before any model is built.
"""
from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, as SD3's feed-forward ("gelu-approximate")."""
    return F.gelu(x, approximate="tanh")


@dataclass
class SD3Config(TransformerConfig):
    """megatron-core ``TransformerConfig`` plus the MMDiT and text-reconstruction fields."""

    in_channels: int = 16
    """Latent channels (SD3's VAE: 16)."""
    patch_size: int = 2
    sample_size: int = 128
    """Latent side the sin-cos table is normalised to (diffusers' ``sample_size``)."""
    pos_embed_max_size: int = 192
    """Side of the position table in patches; latents up to ``pos_embed_max_size * patch_size``."""
    joint_attention_dim: int = 4096
    """Width of the text-encoder tokens fed to ``context_embedder``."""
    pooled_projection_dim: int = 2048
    text_seq_len: int = 333
    """Text tokens per sample in the data (77 CLIP + 256 T5 for SD3)."""
    qk_norm: bool = False
    """RMSNorm on queries and keys of both streams (SD3.5)."""
    dual_attention_layers: tuple = ()
    """0-based block indices with MMDiT-X's second, image-only attention (SD3.5-medium: 0..12)."""
    context_pre_only_last: bool = False
    """The last block drops the text stream (full SD3 layouts); sd3_light keeps it."""
    zero_init_adaln: bool = True
    """adaLN-Zero: zero the modulation and output-head weights at initialisation (DiT)."""
    text_recon_gamma: float = 0.0
    """Weight of the text-feature reconstruction loss; 0 turns it off (no extra tensor anywhere)."""
    text_recon_target_layer: int = 0
    """0: text tokens after ``context_embedder``; k >= 1: text output of joint block k (1-based)."""
    pseudo_huber_c: Optional[float] = None
    """Denoise loss ``sqrt(d^2 + c^2) - c`` when set, MSE otherwise."""
    text_pad_multiple: int = 1
    """Pad the text stream to a multiple of this many tokens (16 for FP8 GEMMs); pads are kept out
    of attention and of the text-reconstruction loss."""
    fp8_gemms: str = "all"
    """With FP8 on: which joint-block GEMMs run in FP8 (``rule`` / ``all``; backends/fp8_settings.py)."""
    init_seed: int = 1234
    """Seed of the layout-independent initialisation (each block from (seed, layer number))."""

    def __post_init__(self):
        self.dual_attention_layers = tuple(int(i) for i in self.dual_attention_layers)
        # selective recompute: the joint block's own --recompute-modules (recompute.py), which
        # megatron's check does not know; it sees none and they are put back after it.
        from megatron_sd3.recompute import SELECTIVE_MODULES, check_recompute_fields

        modules = self.recompute_modules
        if self.recompute_granularity == "selective":
            modules = list(SELECTIVE_MODULES) if modules is None else list(modules)
            problem = check_recompute_fields("selective", self.recompute_method, self.recompute_num_layers, modules)
            if problem:
                raise ConfigError(problem)
            self.recompute_modules = []
        super().__post_init__()
        if self.recompute_granularity == "selective":
            self.recompute_modules = modules

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def text_recon(self) -> bool:
        return self.text_recon_gamma > 0

    def padded_text(self, text_len: int) -> int:
        """Text tokens as they travel: ``text_len`` rounded up to ``text_pad_multiple``."""
        m = max(1, self.text_pad_multiple)
        return int(math.ceil(int(text_len) / m) * m)

    @property
    def padded_text_len(self) -> int:
        return self.padded_text(self.text_seq_len)

    def num_image_tokens(self, latent_h: int, latent_w: int) -> int:
        return (latent_h // self.patch_size) * (latent_w // self.patch_size)

    def block_keeps_text(self, layer_number: int) -> bool:
        """Whether joint block ``layer_number`` (1-based) outputs a text stream."""
        return not (self.context_pre_only_last and layer_number == self.num_layers)


# Architecture presets. Values are the arguments of ``SD3Config`` (plus megatron's names).
_SD35_MEDIUM = dict(
    num_layers=24, hidden_size=1536, num_attention_heads=24, sample_size=128,
    pos_embed_max_size=384, qk_norm=True, dual_attention_layers=tuple(range(13)),
    context_pre_only_last=True,
)
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: exercises qk-norm and dual attention; 8x8 latents, 16 text tokens of width 32.
    "tiny": dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, in_channels=16, patch_size=2,
        sample_size=8, pos_embed_max_size=16, joint_attention_dim=32, pooled_projection_dim=32,
        text_seq_len=16, qk_norm=True, dual_attention_layers=(0, 1), context_pre_only_last=False,
    ),
    # The origin's model: first 15 blocks of SD3.5-medium, the 15th keeps its text stream.
    "sd3_light": {**_SD35_MEDIUM, "num_layers": 15, "context_pre_only_last": False},
    "sd3_medium": dict(
        num_layers=24, hidden_size=1536, num_attention_heads=24, sample_size=128,
        pos_embed_max_size=192, qk_norm=False, dual_attention_layers=(), context_pre_only_last=True,
    ),
    "sd35_medium": dict(_SD35_MEDIUM),
    "sd35_large": dict(
        num_layers=38, hidden_size=2432, num_attention_heads=38, sample_size=128,
        pos_embed_max_size=192, qk_norm=True, dual_attention_layers=(), context_pre_only_last=True,
    ),
}

# ---- configuration fields: one declaration gives a flag, a TOML key and an effective-config entry --
@dataclass(frozen=True)
class Field:
    """One configuration value. ``megatron_sd3.arguments`` makes its command-line flag (Megatron-LM's
    name: ``--`` + the name with dashes), the TOML key of its section checks against it, and the
    run's effective configuration lists it.

    ``type`` is ``bool``, ``int``, ``float``, ``str`` or ``list`` (of ``item``: integers unless
    said otherwise).
    ``default`` None with ``section="model"`` means "the preset's value". ``check`` returns what
    the value must be (e.g. ``">= 1"``) when it is not acceptable, else None. A bool field gets
    ``--NAME`` and ``--no-NAME`` unless ``negatable`` is false. Fields with the same ``exclusive``
    tag are alternatives: one given on the command line drops the others' TOML values.
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    choices: Optional[tuple] = None
    check: Optional[Callable[[Any], Optional[str]]] = None
    negatable: bool = True
    exclusive: Optional[str] = None
    item: type = int

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def type_name(self) -> str:
        if self.type is list:
            return "list of integers" if self.item is int else "list of strings"
        return self.type.__name__

    def coerce(self, value: Any) -> tuple[Any, Optional[str]]:
        """(normalised value, None) or (value, what it must be). TOML booleans are not numbers."""
        if value is None:
            return None, None
        t = self.type
        if t is bool:
            ok = isinstance(value, bool)
        elif t is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif t is list:
            if self.item is str and isinstance(value, str):  # one string: a list of it (a path may hold spaces)
                value = [value]
            if self.item is str and isinstance(value, (list, tuple)):  # TOML numbers among words: [0.7, "A"]
                value = [str(i) if isinstance(i, (int, float)) and not isinstance(i, bool) else i for i in value]
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(i, self.item) and not isinstance(i, bool) for i in value)
            value = tuple(value) if ok else value
        else:
            ok = isinstance(value, t) and not isinstance(value, bool)
        if not ok:
            return value, f"{self.type_name()}, got {type(value).__name__} {value!r}"
        if self.choices is not None and value not in self.choices:
            return value, (f"one of {', '.join(map(str, self.choices))}; got {value!r}"
                           f"{_suggest(str(value), [str(c) for c in self.choices])}")
        problem = self.check(value) if self.check else None
        if problem:
            return value, f"{problem}, got {value!r}"
        return value, None

    def checked(self, value: Any, where: str) -> Any:
        """The normalised value, or a ConfigError naming ``where`` (a TOML section or a flag)."""
        value, problem = self.coerce(value)
        if problem:
            raise ConfigError(f"{where} must be {problem}")
        return value


def at_least(lo, note: str = "") -> Callable[[Any], Optional[str]]:
    return lambda v: None if v >= lo else f">= {lo}{note}"


def above(lo, note: str = "") -> Callable[[Any], Optional[str]]:
    return lambda v: None if v > lo else f"> {lo}{note}"


def check_table(table: Any, fields: Sequence[Field], where: str) -> dict[str, Any]:
    """Check one TOML section against its fields: unknown keys (with a close match), types,
    choices, ranges. Returns the normalised values."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    by_name = {f.name: f for f in fields}
    out = {}
    for key, value in table.items():
        if key not in by_name:
            raise ConfigError(f"{where}: unknown key '{key}'{_suggest(key, by_name)}; "
                              f"valid keys: {', '.join(sorted(by_name))}")
        out[key] = by_name[key].checked(value, f"{where}: '{key}'")
    return out


def _block_indices(v) -> Optional[str]:
    return None if all(i >= 0 for i in v) else "a list of block indices >= 0"


# The [model] section: architecture (over the preset's values) and the seed's loss fields.
# Every one is also a flag; None = the preset's value.
MODEL_FIELDS: list[Field] = [
    Field("preset", str, "tiny", "base architecture", choices=tuple(PRESETS)),
    Field("num_layers", int, None, "joint blocks: the preset's first N (its dual attention on those "
          "that remain)", check=above(0)),
    Field("hidden_size", int, None, "transformer width", check=above(0)),
    Field("num_attention_heads", int, None, "attention heads", check=above(0)),
    Field("ffn_hidden_size", int, None, "MLP width (4 x hidden size in every preset)", check=above(0)),
    Field("in_channels", int, None, "latent channels", check=above(0)),
    Field("patch_size", int, None, "latent patch side", check=above(0)),
    Field("sample_size", int, None, "latent side the position table is normalised to", check=above(0)),
    Field("pos_embed_max_size", int, None, "side of the position table in patches", check=above(0)),
    Field("joint_attention_dim", int, None, "width of the text-encoder tokens", check=above(0)),
    Field("pooled_projection_dim", int, None, "width of the pooled text vector", check=above(0)),
    Field("text_seq_len", int, None, "text tokens per sample", check=above(0)),
    Field("qk_norm", bool, None, "RMSNorm on queries and keys (SD3.5)"),
    Field("dual_attention_layers", list, None, "0-based blocks with MMDiT-X's second, image-only "
          "attention", check=_block_indices),
    Field("context_pre_only_last", bool, None, "the last block drops the text stream (full SD3 layouts)"),
    Field("zero_init_adaln", bool, None, "adaLN-Zero: zero the modulation and output-head weights"),
    Field("text_recon_gamma", float, None, "weight of the text reconstruction loss; 0 = off",
          check=at_least(0, " (0 turns it off)")),
    Field("text_recon_target_layer", int, None,
          "0: text tokens after context_embedder; k: text output of joint block k", check=at_least(0)),
    Field("pseudo_huber_c", float, None, "pseudo-Huber denoise loss constant (MSE when unset)",
          check=above(0, " (omit it for MSE)")),
    Field("init_seed", int, None, "seed of the layout-independent initialisation (default: --seed)"),
]
MODEL_KEYS: dict[str, Field] = {f.name: f for f in MODEL_FIELDS}


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_model_fields(fields: dict[str, Any], where: str = "[model]") -> dict[str, Any]:
    """Check keys, types and ranges of model fields; returns a normalised copy."""
    return check_table(fields, MODEL_FIELDS, where)


def check_model_consistency(f: dict[str, Any]) -> None:
    """Cross-field rules, said before any model is built (docs/design.md, section "Text reconstruction")."""
    n, hidden, heads = f["num_layers"], f["hidden_size"], f["num_attention_heads"]
    if hidden % heads:
        raise ConfigError(f"[model]: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if (hidden // heads) % 2:
        raise ConfigError(f"[model]: head dim {hidden // heads} must be even")
    if hidden % 4:
        raise ConfigError(f"[model]: hidden_size {hidden} must be a multiple of 4 (2D sin-cos table)")
    bad = [i for i in f.get("dual_attention_layers", ()) if i >= n]
    if bad:
        raise ConfigError(f"[model]: dual_attention_layers {bad} out of range for num_layers={n} "
                          f"(indices are 0-based)")
    if f.get("sample_size", 128) % f.get("patch_size", 2):
        raise ConfigError("[model]: sample_size must be a multiple of patch_size")
    gamma = f.get("text_recon_gamma", 0.0)
    k = f.get("text_recon_target_layer", 0)
    if gamma > 0:
        if f.get("context_pre_only_last", False):
            raise ConfigError(
                "[model]: text_recon_gamma > 0 needs a last block with a text stream, but "
                "context_pre_only_last = true; set it false (as sd3_light does) or text_recon_gamma = 0")
        if k >= n:
            raise ConfigError(
                f"[model]: text_recon_target_layer = {k} gives no meaningful target with num_layers = {n} "
                f"(block {n} is the last block itself); choose 0..{n - 1}")


def model_fields(preset: str = "tiny", **overrides) -> dict[str, Any]:
    """Preset fields with overrides applied and checked."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'{_suggest(preset, PRESETS)}; "
                          f"choose one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[preset])
    checked = check_model_fields(overrides, where="model override")
    if "num_layers" in checked and "dual_attention_layers" not in checked:
        # fewer blocks than the preset = its first N blocks, with their dual attention
        fields["dual_attention_layers"] = tuple(
            i for i in fields.get("dual_attention_layers", ()) if i < checked["num_layers"])
    fields.update(checked)
    check_model_consistency(fields)
    return fields


def make_config(preset: str = "tiny", *, parallel: Optional[dict] = None, **overrides) -> SD3Config:
    """Build an ``SD3Config`` from a preset, model overrides and megatron parallel/precision fields.

    ``parallel`` takes ``TransformerConfig`` fields that are not model architecture
    (``tensor_model_parallel_size``, ``pipeline_model_parallel_size``, ``bf16``,
    ``params_dtype``, ``num_layers_in_first_pipeline_stage``, ...).
    """
    fields = model_fields(preset, **overrides)
    fields.pop("preset", None)
    p = dict(parallel or {})
    params_dtype = p.pop("params_dtype", torch.float32)
    if p.get("fp8"):
        # FP8 GEMMs want token counts in multiples of 16: pad the text stream
        # (docs/design.md, section "Activation packing").
        p.setdefault("text_pad_multiple", 16)
        # megatron's default recipe is "delayed" (TE only); the torchao backend is tensorwise.
        p.setdefault("fp8_recipe", "tensorwise")
    return SD3Config(
        **fields,
        # SD3 block conventions, as megatron-core names them.
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        normalization="RMSNorm",  # only the qk-norm reads it; block norms are affine-free LN
        # qk-norm weights are shared by all heads, and each TP rank sees only its heads: this
        # makes megatron's finalize_model_grads sum their gradients over TP.
        qk_layernorm=bool(fields.get("qk_norm", False)),
        layernorm_epsilon=1e-6,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,  # full master weight then TP split: same weights at any TP
        params_dtype=params_dtype,
        pipeline_dtype=p.pop("pipeline_dtype", params_dtype),
        calculate_per_token_loss=True,
        **p,
    )


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def model_config_from_toml(path: str | Path) -> dict[str, Any]:
    """The checked ``[model]`` fields of a TOML file (preset applied)."""
    data = load_toml(path)
    section = data.get("model", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [model] must be a table")
    fields = check_model_fields(section, where=f"{path} [model]")
    preset = fields.pop("preset", "tiny")
    return {"preset": preset, **fields}


def config_to_dict(cfg: SD3Config) -> dict[str, Any]:
    """The model fields of a config, for saving beside checkpoints and for conversion."""
    keys = [k for k in MODEL_KEYS if k != "preset"]
    out = {k: getattr(cfg, k) for k in keys}
    out["dual_attention_layers"] = list(out["dual_attention_layers"])
    return out


__all__ = [
    "ConfigError", "SD3Config", "PRESETS", "MODEL_KEYS", "make_config", "model_fields",
    "check_model_fields", "check_model_consistency", "Field", "MODEL_FIELDS", "check_table", "at_least", "above", "load_toml", "model_config_from_toml",
    "config_to_dict", "gelu_tanh",
]
