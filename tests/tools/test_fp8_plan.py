"""The step-time model behind tools/fp8_plan.py (megatron_sd3/step_time.py) and the tool itself."""
import json
import os

import pytest

from _ranks import ROOT, run_script
from megatron_sd3 import step_time
from megatron_sd3.config import make_config
from megatron_sd3.flops import mmdit_flops_per_sample

LATENT_1024 = (128, 128)


@pytest.mark.parametrize("preset, overrides", [("sd3_light", {}), ("sd3_light", {"text_recon_gamma": 0.5}),
                                                ("sd35_large", {}), ("sd3_medium", {})])
def test_the_gemms_and_attention_are_the_flop_count_of_flops_py(preset, overrides):
    """Every joint-block GEMM of the step list plus the attention products add up to the MFU
    FLOP count (flops.py, a closed form written separately), exactly, micro batch 3."""
    cfg = make_config(preset, **overrides)
    b, i = 3, cfg.num_image_tokens(*LATENT_1024)
    gemms = sum(g.flops for g in step_time.step_gemms(cfg, LATENT_1024, b) if g.in_blocks)
    ours = 3 * gemms + step_time.attention_flops(cfg, LATENT_1024, b)
    want = b * mmdit_flops_per_sample(cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, i, cfg.text_seq_len,
                                      dual_attention_layers=len(cfg.dual_attention_layers),
                                      text_recon=cfg.text_recon, context_pre_only_last=cfg.context_pre_only_last,
                                      training=True)
    assert ours == want


def test_tensor_and_context_parallel_split_the_work():
    cfg = make_config("sd3_light")
    one = sum(g.flops for g in step_time.step_gemms(cfg, LATENT_1024, 4) if g.m > 4)
    tp2 = sum(g.flops for g in step_time.step_gemms(cfg, LATENT_1024, 4, tp=2) if g.m > 4 and g.in_blocks)
    blocks = sum(g.flops for g in step_time.step_gemms(cfg, LATENT_1024, 4) if g.m > 4 and g.in_blocks)
    assert tp2 == blocks / 2 and one > blocks
    assert step_time.attention_flops(cfg, LATENT_1024, 4, cp=2) == step_time.attention_flops(cfg, LATENT_1024, 4) / 2


def test_the_measured_h200_step_is_reproduced():
    """The constants are solved on the one H200 measurement (sd3_light, 1024 px, micro batch 4,
    compiled): the model must give back its parts and both totals."""
    m = step_time.MEASURED
    p = step_time.plan(make_config("sd3_light"), LATENT_1024, 4, "h200", fp8="all")
    assert p["bf16_ms"] == pytest.approx(m["bf16_ms"], rel=1e-3)
    assert p["fp8_ms"] == pytest.approx(m["fp8_ms"], rel=1e-3)
    assert p["attention_ms"] == pytest.approx(m["attention_ms"], rel=1e-3)
    assert p["gemm_bf16_ms"] == pytest.approx(m["gemm_bf16_ms"], rel=1e-3)
    c = p["calibration"]
    solved = step_time.solve_calibration()  # the kept constants are the solution
    for k, v in c.items():
        assert getattr(solved, k) == pytest.approx(v, rel=1e-9), k
    assert 0 < c["gemm_eff_fp8"] < 1 and 0 < c["gemm_eff_bf16"] < 1 and 0 < c["mem_eff"] < 1 and 0 < c["attn_eff"] < 1


def test_the_calibration_point_is_the_committed_h200_log():
    """``MEASURED`` is the H200 measurement in docs/results/gpu_h200_runs.jsonl: the 2026-12-04
    compiled steps and the 2026-11-26 compiled bf16 / FP8 profiles."""
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "docs", "results", "gpu_h200_runs.jsonl"))]
    m = step_time.MEASURED

    def one(**want):
        (row,) = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
        return row

    step = dict(kind="bench", date="2026-12-04", blocks="compiled", resolution=m["resolution"], micro_batch=m["micro_batch"])
    assert one(variant="bf16", **step)["ms_per_iter"] == m["bf16_ms"]
    assert one(variant="fp8-local", **step)["ms_per_iter"] == m["fp8_ms"]
    prof = dict(kind="profile", blocks="compiled", resolution=m["resolution"], micro_batch=m["micro_batch"])
    bf16 = one(variant="bf16", **prof)["device_ms_per_iter"]
    assert (bf16["attention"], bf16["gemm"]) == (m["attention_ms"], m["gemm_bf16_ms"])
    assert one(variant="fp8-local", **prof)["device_ms_per_iter"]["gemm"] == m["gemm_fp8_ms"]


def test_the_rule_keeps_small_gemms_in_bf16_and_moves_large_ones_to_fp8():
    """Per GEMM, FP8 when its FP8 GEMMs plus casts beat bf16: never the modulation (micro-batch
    rows); at sd3_light's width nothing (the measured 0.97x); at a width where the big image
    GEMMs' FLOPs outgrow their casts, those."""
    light = make_config("sd3_light")
    rows = step_time.plan(light, LATENT_1024, 4, "h200")["gemms"]
    assert not [r["name"] for r in rows if r["fp8"]]
    wide = make_config("sd3_light", hidden_size=16384, num_attention_heads=256)
    rows = {r["name"]: r for r in step_time.plan(wide, LATENT_1024, 4, "h200")["gemms"]}
    assert rows["image.fc1"]["fp8"] and rows["image.fc2"]["fp8"] and rows["image.qkv"]["fp8"]
    assert not rows["image.modulation"]["fp8"] and not rows["text.modulation"]["fp8"]
    assert not rows["patch_embed"]["fp8"]  # outside the joint blocks: the FP8 backends leave it bf16
    for g in step_time.step_gemms(wide, LATENT_1024, 4):
        if g.in_blocks:
            assert step_time.fp8_pays(g, "h200") == rows[g.name]["fp8"] or g.name == "image.modulation"


def test_the_tool_prints_one_json_line_and_refuses_an_unknown_gpu():
    r = run_script("tools/fp8_plan.py", ["--preset", "sd3_light", "--resolution", "1024", "--micro-batch-size",
                                         "4", "--gpu", "h200", "--fp8-gemms", "all", "--json"], timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["speedup"] == pytest.approx(out["bf16_ms"] / out["fp8_ms"], rel=1e-3)
    assert abs(out["bf16_ms"] / 267.3 - 1) < 0.3 and 0.85 <= out["speedup"] / 0.974 <= 1.10
    assert {"1.1x", "1.3x"} == set(out["thresholds"]) and out["thresholds"]["1.1x"]["hidden_size"] > 1536
    assert len(out["gemms"]) >= 12
    import torch

    from megatron_sd3.memory import GiB, plan_memory

    cfg = make_config("sd3_light", parallel=dict(bf16=True, params_dtype=torch.bfloat16))
    want = plan_memory(cfg, latent_hw=LATENT_1024, micro_batch=4)[0]
    assert out["memory_GiB"] == {k: round(want[k] / GiB, 2) for k in out["memory_GiB"]}
    assert out["memory_GiB"]["weights"] == round(2 * 1_509_028_800 / GiB, 2)  # bf16: 2 bytes a parameter
    bad = run_script("tools/fp8_plan.py", ["--gpu", "a100"], timeout=200)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("fp8_plan.py: error: --gpu 'a100'")
