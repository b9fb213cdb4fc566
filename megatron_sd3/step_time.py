"""A step-time model of sd3_light-style training on one GPU: where FP8 pays, before a GPU is spent.

One training step (micro batch ``b``) is split into the parts FP8 changes and the parts it does
not:

    bf16 step = attention + sum over GEMMs of 3 x t_bf16(M, K, N) + other
    FP8 step  = attention + sum over GEMMs of (FP8 ? 3 x t_fp8(M, K, N) + t_cast : 3 x t_bf16) + other

* **GEMMs**: every linear of a step (``step_gemms``): per joint block and stream (image: ``b*I``
  rows, text: ``b*T`` rows) qkv, output projection, MLP in and out, the adaLN modulation (``b``
  rows), the image-only attention of dual-attention blocks; the embedders and the head. Column-
  parallel widths are split over TP, row-parallel inputs too; CP (Ulysses) splits the image rows.
  Forward, grad-input and grad-weight GEMMs have the same FLOPs and operand sizes, hence the 3.
  Each runs at a roofline: ``max(2MKN / (peak x eff), bytes / bandwidth)``.
* **FP8 casts** (torchao's dynamic tensorwise scaling): every GEMM operand is cast twice per step
  (activations for the forward and the grad-weight GEMM, weights for forward and grad-input,
  output gradients for grad-input and grad-weight), each cast a 2-byte read and a 1-byte write
  (the amax fused into the producer by the compiler), at ``mem_eff`` of the memory bandwidth.
* **Attention** stays bf16 (FP8 does not touch it): ``3 x 4 S^2 h`` FLOPs per sample and block
  (``S`` = image + text tokens, plus ``4 I^2 h`` for a dual-attention block) at ``attn_eff``.
* **Other** (norms, modulation, activations, optimizer, embedders' element-wise work, idle):
  measured, scaled with ``b x S x h x layers``.

Constants (``CALIBRATION``, from :func:`solve_calibration`) come from the one H200 measurement of sd3_light at 1024 px, micro batch
4, compiled: the step totals of 2026-12-04 (bf16 267.3 ms, torchao FP8 tensorwise 274.5 ms) and the
split of the profiled compiled bf16 step (attention 103 ms, GEMMs 74 ms; torchao's FP8 GEMMs 61 ms):
README "One GPU", docs/results/gpu_h200_runs.jsonl. Each efficiency is solved so the model
reproduces its part; FP8's casts are what is left of the FP8 step (274.5 - 267.3 + 74 - 61 = 20.2
ms). A single calibration point: the model says where FP8's GEMM savings outgrow its casts as
shapes change, not how a kernel library behaves at shapes never measured.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megatron_sd3.flops import PEAK_TFLOPS

# HBM bandwidth, TB/s (NVIDIA data sheets); peaks from flops.PEAK_TFLOPS
BANDWIDTH_TBPS = {"H100": 3.35, "H200": 4.8}
GPUS = {"h100": "H100", "h200": "H200"}

# The measured case the constants are solved on (README "One GPU", H200)
MEASURED = dict(gpu="h200", preset="sd3_light", resolution=1024, micro_batch=4, bf16_ms=267.3, fp8_ms=274.5,
                attention_ms=103.0, gemm_bf16_ms=74.0, gemm_fp8_ms=61.0)
CAST_BYTES_PER_ELEMENT = 3  # bf16 read (2) + FP8 write (1); the amax fused into the producer
CASTS_PER_OPERAND = 2  # each operand feeds two of the step's three GEMMs


@dataclass(frozen=True)
class Gemm:
    """One linear's forward GEMM, ``[m, k] x [k, n]``, ``count`` times per step."""
    name: str
    m: int
    k: int
    n: int
    count: int = 1
    in_blocks: bool = True  # a joint block's linear (the FP8 backends' scope); False: embedders, head

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.count


@dataclass(frozen=True)
class Calibration:
    gemm_eff_bf16: float
    gemm_eff_fp8: float
    attn_eff: float
    mem_eff: float
    other_ms_per_unit: float  # ms per (micro batch x tokens x hidden x layers)


def step_gemms(cfg, latent_hw, micro_batch: int, tp: int = 1, cp: int = 1, text_tokens: Optional[int] = None):
    """Every GEMM of one micro batch's forward through ``cfg`` (an ``SD3Config``), per rank."""
    h, f, b = cfg.hidden_size, cfg.ffn_hidden_size, micro_batch
    img = b * cfg.num_image_tokens(*latent_hw) // cp
    txt = b * (cfg.text_seq_len if text_tokens is None else text_tokens)
    out = []
    dual = set(cfg.dual_attention_layers)
    for layer in range(1, cfg.num_layers + 1):
        last = layer == cfg.num_layers
        for stream, m in (("image", img), ("text", txt)):
            chunks = 9 if stream == "image" and (layer - 1) in dual else 6
            if stream == "text" and last and cfg.context_pre_only_last:
                out += [Gemm(f"{stream}.qkv", m, h, 3 * h // tp), Gemm(f"{stream}.modulation", b, h, 2 * h)]
                continue
            out += [Gemm(f"{stream}.qkv", m, h, 3 * h // tp), Gemm(f"{stream}.modulation", b, h, chunks * h)]
            if stream == "text" and last and not cfg.text_recon:
                continue  # nothing reads the last block's text output (flops.py)
            out += [Gemm(f"{stream}.proj", m, h // tp, h), Gemm(f"{stream}.fc1", m, h, f // tp),
                    Gemm(f"{stream}.fc2", m, f // tp, h)]
            if stream == "image" and (layer - 1) in dual:
                out += [Gemm("image.attn2.qkv", m, h, 3 * h // tp), Gemm("image.attn2.proj", m, h // tp, h)]
    pc = cfg.patch_size ** 2 * cfg.in_channels
    out += [Gemm("patch_embed", img, pc, h, in_blocks=False),
            Gemm("context_embed", txt, cfg.joint_attention_dim, h, in_blocks=False),
            Gemm("final", img, h, pc, in_blocks=False)]
    merged: dict = {}
    for g in out:  # one row per distinct shape
        key = (g.name, g.m, g.k, g.n, g.in_blocks)
        merged[key] = merged.get(key, 0) + g.count
    return [Gemm(name, m, k, n, count, blocks) for (name, m, k, n, blocks), count in merged.items()]


def attention_flops(cfg, latent_hw, micro_batch: int, tp: int = 1, cp: int = 1, text_tokens=None) -> float:
    """Training-step FLOPs of the attention products (3 x forward), per rank."""
    i = cfg.num_image_tokens(*latent_hw)
    s = i + (cfg.text_seq_len if text_tokens is None else text_tokens)
    h = cfg.hidden_size / (tp * cp)
    per_sample = cfg.num_layers * 4 * s * s * h + len(cfg.dual_attention_layers) * 4 * i * i * h
    return 3.0 * micro_batch * per_sample


def _units(cfg, latent_hw, micro_batch: int, cp: int = 1) -> float:
    s = cfg.num_image_tokens(*latent_hw) // cp + cfg.text_seq_len
    return micro_batch * s * cfg.hidden_size * cfg.num_layers


def gemm_ms(g: Gemm, gpu: str, fp8: bool, cal: Calibration) -> float:
    """One training step's three GEMMs of ``g`` (forward, grad-input, grad-weight), ms."""
    key = GPUS[gpu]
    peak = PEAK_TFLOPS[key]["fp8" if fp8 else "bf16"] * 1e12 * (cal.gemm_eff_fp8 if fp8 else cal.gemm_eff_bf16)
    operand = 1 if fp8 else 2
    nbytes = (operand * (g.m * g.k + g.k * g.n) + 2 * g.m * g.n) * g.count
    bw = BANDWIDTH_TBPS[key] * 1e12 * cal.mem_eff
    return 3 * 1e3 * max(g.flops / peak, nbytes / bw)


def cast_ms(g: Gemm, gpu: str, cal: Calibration) -> float:
    """The FP8 casts one training step makes for ``g``'s operands, ms."""
    elements = (g.m * g.k + g.k * g.n + g.m * g.n) * g.count
    nbytes = CASTS_PER_OPERAND * CAST_BYTES_PER_ELEMENT * elements
    return 1e3 * nbytes / (BANDWIDTH_TBPS[GPUS[gpu]] * 1e12 * cal.mem_eff)


def fp8_pays(g: Gemm, gpu: str, cal: Optional[Calibration] = None) -> bool:
    """FP8 for this GEMM when its FP8 GEMMs plus casts take less than its bf16 GEMMs."""
    cal = cal or calibration()
    return gemm_ms(g, gpu, True, cal) + cast_ms(g, gpu, cal) < gemm_ms(g, gpu, False, cal)


def _solve(f, target: float) -> float:
    """The efficiency in (0, 1] at which the decreasing ``f(eff)`` equals ``target`` (bisection)."""
    lo, hi = 1e-4, 1.0
    if f(hi) > target:
        raise ValueError(f"the measured {target:.1f} ms is faster than the model allows at full efficiency")
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    return (lo + hi) / 2


# solve_calibration()'s result, kept as numbers so that the rule (backends/fp8_settings.py) builds no
# config inside a traced block; tests/tools/test_fp8_plan.py solves them again and compares
CALIBRATION = Calibration(gemm_eff_bf16=0.7919804050980923, gemm_eff_fp8=0.4779105219306844,
                          attn_eff=0.3706307453400904, mem_eff=0.6149889267326736,
                          other_ms_per_unit=2.212277508090615e-07)


def calibration() -> Calibration:
    return CALIBRATION


def solve_calibration() -> Calibration:
    """The constants solved on ``MEASURED`` (see the module docstring)."""
    from megatron_sd3.config import make_config

    m = MEASURED
    cfg = make_config(m["preset"])
    hw = (m["resolution"] // 8, m["resolution"] // 8)
    b, gpu = m["micro_batch"], m["gpu"]
    attn_eff = attention_flops(cfg, hw, b) / (PEAK_TFLOPS[GPUS[gpu]]["bf16"] * 1e12 * m["attention_ms"] / 1e3)
    base = Calibration(1.0, 1.0, attn_eff, 1.0, 0.0)
    bf16 = step_gemms(cfg, hw, b)
    fp8 = step_gemms(cfg, hw, b, text_tokens=cfg.padded_text(cfg.text_seq_len))

    def total(gemms, fp8_on, **eff):
        c = Calibration(**{**asdict(base), **eff})
        return sum(gemm_ms(g, gpu, fp8_on and g.in_blocks, c) for g in gemms)

    # memory-bound GEMMs (modulation) read at the casts' efficiency: solve the casts first at
    # full GEMM efficiency, then the GEMMs with it (two passes settle both)
    mem = 1.0
    eff_bf16 = eff_fp8 = 1.0
    cast_target = m["fp8_ms"] - m["bf16_ms"] + m["gemm_bf16_ms"] - m["gemm_fp8_ms"]
    for _ in range(3):
        eff_bf16 = _solve(lambda e: total(bf16, False, gemm_eff_bf16=e, mem_eff=mem), m["gemm_bf16_ms"])
        fp8_block_target = m["gemm_fp8_ms"] - total([g for g in fp8 if not g.in_blocks], False,
                                                     gemm_eff_bf16=eff_bf16, mem_eff=mem)
        eff_fp8 = _solve(lambda e: total([g for g in fp8 if g.in_blocks], True, gemm_eff_fp8=e, mem_eff=mem),
                         fp8_block_target)
        cal = Calibration(eff_bf16, eff_fp8, attn_eff, 1.0, 0.0)
        mem = sum(cast_ms(g, gpu, cal) for g in fp8 if g.in_blocks) / cast_target
    other = (m["bf16_ms"] - m["attention_ms"] - m["gemm_bf16_ms"]) / _units(cfg, hw, b)
    return Calibration(eff_bf16, eff_fp8, attn_eff, mem, other)


def plan(cfg, latent_hw, micro_batch: int, gpu: str = "h200", tp: int = 1, cp: int = 1, fp8: str = "rule") -> dict:
    """The modelled step: ``bf16_ms``, ``fp8_ms`` (``fp8``: "rule" = FP8 where it pays, "all" =
    every block GEMM), ``speedup`` and the per-GEMM table."""
    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu!r} unknown; use one of {', '.join(GPUS)}")
    cal = calibration()
    padded = -(-cfg.text_seq_len // 16) * 16  # FP8 pads the text stream to a multiple of 16 (fp8_settings.py)
    attn = 1e3 * attention_flops(cfg, latent_hw, micro_batch, tp, cp) / (
        PEAK_TFLOPS[GPUS[gpu]]["bf16"] * 1e12 * cal.attn_eff)
    other = cal.other_ms_per_unit * _units(cfg, latent_hw, micro_batch, cp)
    rows, bf16_gemm, fp8_gemm = [], 0.0, 0.0
    for g, g8 in zip(step_gemms(cfg, latent_hw, micro_batch, tp, cp),
                     step_gemms(cfg, latent_hw, micro_batch, tp, cp, text_tokens=padded)):
        t16 = gemm_ms(g, gpu, False, cal)
        t8 = gemm_ms(g8, gpu, True, cal) + cast_ms(g8, gpu, cal) if g.in_blocks else None
        use = g.in_blocks and (fp8 == "all" or (fp8 == "rule" and fp8_pays(g8, gpu, cal)))
        bf16_gemm += t16
        fp8_gemm += t8 if use else t16
        rows.append(dict(name=g.name, m=g.m, k=g.k, n=g.n, count=g.count, bf16_ms=round(t16, 3),
                         fp8_ms=None if t8 is None else round(t8, 3), fp8=bool(use)))
    bf16_ms, fp8_ms = attn + bf16_gemm + other, attn + fp8_gemm + other
    return dict(gpu=gpu, bf16_ms=round(bf16_ms, 2), fp8_ms=round(fp8_ms, 2), speedup=round(bf16_ms / fp8_ms, 4),
                fp8_mode=fp8, attention_ms=round(attn, 2), other_ms=round(other, 2),
                gemm_bf16_ms=round(bf16_gemm, 2), gemm_fp8_ms=round(fp8_gemm, 2), gemms=rows,
                calibration=asdict(cal))


def thresholds(make, values, target: float, **plan_kwargs):
    """The first of ``values`` whose config ``make(value)`` -> (cfg, latent_hw, micro_batch) the
    model gives ``speedup >= target``, or None."""
    for v in values:
        cfg, hw, mb = make(v)
        if plan(cfg, hw, mb, **plan_kwargs)["speedup"] >= target:
            return v
    return None
