"""The benchmark tools (``make bench``) on CPU: they run, report what they claim, free memory."""
import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

from _ranks import ROOT, one_process_env, run_script


def _tool(name, *args, timeout=240):
    return run_script(os.path.join("tools", name), args, env=one_process_env(), cwd=ROOT, timeout=timeout)


@pytest.mark.timeout(300)
@pytest.mark.slow  # a benchmark (make bench runs it); the other bench tests here are quick
def test_bench_throughput_rows_and_kernel_breakdown(tmp_path):
    out = tmp_path / "b.json"
    r = _tool("bench_throughput.py", "--resolution", "64", "--warmup", "1", "--iters", "1",
              "--variants", "bf16", "fp8-local", "fp8-rowwise", "--recon", "off", "on", "--profile",
              "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["complete"] and len(d["rows"]) == 6 and not any("error" in row for row in d["rows"])
    for row in d["rows"]:
        assert row["ms_per_iter"] > 0 and row["samples_per_s"] > 0
        kt = row["kernel_time"]
        assert kt["kernel_ms_per_iter"] > 0 and kt["by_class_ms"]["gemm"] > 0
        assert kt["kernels_per_iter"] > 10  # the operators of a training step, each a launch on a GPU
        assert abs(sum(kt["by_class_ms"].values()) - kt["kernel_ms_per_iter"]) < 0.05 * kt["kernel_ms_per_iter"] + 0.1
    from megatron_sd3.config import make_config
    from megatron_sd3.flops import model_flops_per_sample

    for row in d["rows"]:  # the training log's count (blocks, embedders, head), unpadded text
        cfg = make_config("tiny", text_recon_gamma=0.5 if row["text_recon"] == "on" else 0.0)
        assert row["model_flop_per_sample"] == model_flops_per_sample(cfg, (8, 8), training=True)
    fp8 = [row for row in d["rows"] if row["variant"] == "fp8-local"]
    assert all(row["txt_tokens"] == 16 for row in fp8)  # tiny: 16 text tokens, already aligned
    s = d["summary"]["64"]
    assert "fp8-local_speedup_vs_fp32" in s and "fp8-rowwise_speedup_vs_fp32" in s and "fp32_recon_slowdown" in s


@pytest.mark.timeout(240)
def test_bench_hidden_size_widens_the_model_and_rows_carry_the_plans(tmp_path):
    """``--hidden-size`` (where FP8 starts to pay) builds the preset at that width, heads of 64,
    MLP 4x, and the FLOP count follows; a width that is no multiple of 64 is one line, exit != 0.
    Each row reaches ``--rows-jsonl`` as it is measured, tagged, with what the planners say of it
    (the step-time model's ms, the rule's FP8 GEMMs, the theoretical memory) for its own config,
    built with pretrain's ``--fp8-gemms rule`` for ``fp8-rule``, ``all`` for ``fp8-local``."""
    out, log = tmp_path / "w.json", tmp_path / "rows.jsonl"
    r = _tool("bench_throughput.py", "--hidden-size", "128", "--num-layers", "2", "--resolution", "32",
              "--warmup", "0", "--iters", "1", "--variants", "bf16", "fp8-rule", "fp8-local", "--recon", "off",
              "--json", str(out), "--rows-jsonl", str(log), "--tag", "wide")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    device = json.loads(out.read_text())["device"]
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        dict(tag="wide", device=device, **{k: v for k, v in row.items() if k != "best"}) for row in rows]
    assert [(row["variant"], row["fp8_gemms"]) for row in rows] == [("fp32", None), ("fp8-rule", "rule"),
                                                                   ("fp8-local", "all")]
    from megatron_sd3 import step_time
    from megatron_sd3.config import make_config
    from megatron_sd3.flops import model_flops_per_sample
    from megatron_sd3.memory import GiB, plan_memory

    cfg = make_config("tiny", num_layers=2, hidden_size=128, num_attention_heads=2, text_recon_gamma=0.0)
    assert cfg.ffn_hidden_size == 512
    for row in rows:
        assert (row["hidden_size"], row["num_layers"]) == (128, 2)
        assert row["model_flop_per_sample"] == model_flops_per_sample(cfg, (4, 4), training=True)
        plan = step_time.plan(cfg, (4, 4), 4, gpu="h100", fp8=row["fp8_gemms"] or "all")
        assert row["plan_gpu"] == "h100"  # a CPU: the H100's constants
        assert row["planned_ms"] == (plan["fp8_ms"] if row["fp8_gemms"] else plan["bf16_ms"])
        assert row["planned_fp8_gemms"] == (sorted({g["name"] for g in plan["gemms"] if g["fp8"]})
                                            if row["fp8_gemms"] else [])
        assert row["planned_mem_GiB"] == round(plan_memory(cfg, latent_hw=(4, 4), micro_batch=4)[0]["total"] / GiB, 2)
    assert rows[2]["planned_fp8_gemms"] and not rows[1]["planned_fp8_gemms"]
    r = _tool("bench_throughput.py", "--hidden-size", "100", "--variants", "bf16")
    assert r.returncode != 0 and "--hidden-size 100: must be a positive multiple of 64" in r.stderr


def test_bench_per_gemm_variant_sets_the_compile_regions():
    """``fp8-per-gemm`` is fp8-local's settings compiled with a region per FP8 GEMM; measuring
    any other variant afterwards compiles whole blocks again."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_throughput as bt
    from megatron_sd3.backends import torchao as fp8_torchao

    (local, per_gemm) = bt.variants(False, ["fp8-local", "fp8-per-gemm"])
    assert per_gemm[1:] == local[1:] and per_gemm[0] == "fp8-per-gemm"
    try:
        bt.set_compile_regions("fp8-per-gemm")
        assert fp8_torchao.COMPILE_REGIONS == "gemm"
        bt.set_compile_regions("fp8-local")
        assert fp8_torchao.COMPILE_REGIONS == "block"
    finally:
        fp8_torchao.COMPILE_REGIONS = "block"


@pytest.mark.timeout(120)
def test_bench_attention_runs_each_backend_or_says_why(tmp_path):
    out = tmp_path / "a.json"
    r = _tool("bench_attention.py", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    by = {(x["case"], x["backend"]): x for x in rows}
    assert {c for c, _ in by} == {"joint", "joint+pad-mask", "image"}
    assert by[("joint", "flash")]["fwd_bwd_ms"] > 0 and by[("joint", "unfused")]["fwd_bwd_ms"] > 0
    if not torch.cuda.is_available():
        assert "error" in by[("joint", "fused")]  # cuDNN: no CPU kernel


@pytest.mark.timeout(120)
def test_bench_frees_each_variant_before_the_next(single_process):
    """The config holds optimizer and DDP through megatron's hooks and the model holds the
    config: ``free`` must break that cycle, or the next variant's memory figures include this one."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_throughput as bt

    args = bt.argparse.Namespace(preset="tiny", num_layers=None, hidden_size=None, init="cpu", warmup=1,
                                 iters=1, attention_backend="auto", profile=False)
    gc.collect()
    gc.disable()  # only what free() releases counts, not a later automatic collection
    try:
        built = bt.Built(args, "fp32", None, "local", False, 0.0, torch.device("cpu"))
        built.measure(32, 2)
        ref = weakref.ref(next(built.chunks[0].parameters()))
        built.free()
        del built
        assert ref() is None, "the model outlived Built.free()"
    finally:
        gc.enable()


@pytest.mark.timeout(300)
def test_check_te_tool(tmp_path):
    """tools/check_te.py: without TE one clear line and exit 2; its machinery (weight copy
    between fillings, warm-up, comparison, bounds) checked with the local filling as candidate:
    identical in fp32, FP8 (torchao) visibly different but within the bounds."""
    from megatron_sd3.models.mmdit_layer_specs import transformer_engine_available

    if not transformer_engine_available():
        r = _tool("check_te.py")
        assert r.returncode == 2
        lines = [line for line in r.stderr.splitlines() if "error:" in line]
        assert len(lines) == 1 and "Transformer Engine is not installed" in lines[0], r.stderr
    out = tmp_path / "te.json"
    r = _tool("check_te.py", "--candidate", "local", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    cases = json.loads(out.read_text())["cases"]
    exact = cases["bf16" if torch.cuda.is_available() else "fp32"]
    if not torch.cuda.is_available():
        assert exact["velocity"] == exact["text_tokens"] == exact["grad_max"] == 0.0
    fp8 = cases["fp8"]
    assert fp8["ok"] and fp8["velocity"] > 0 and fp8["grad_median"] > 1e-3  # FP8 really ran


@pytest.mark.slow  # a benchmark (make bench runs it at full size); this checks it runs and prints its ratios
@pytest.mark.timeout(300)
def test_bench_corpus_prints_both_ratios():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_corpus.py"), "--tars", "2", "--per-tar",
                        "4", "--small", "50", "--large", "500"], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "preprocessing 2 ranks / 1 rank: " in r.stdout and "start-up 500 / 50 samples: time " in r.stdout


@pytest.mark.timeout(240)
@pytest.mark.slow  # a benchmark (make bench runs it); its memory part is in test_memory_plan.py
def test_bench_context_parallel_times_cp2_against_cp1_in_one_run(tmp_path):
    """The step-time ratio of CP=2 to CP=1 (DP=2) on 2 processes, alternated round by round."""
    path = tmp_path / "cp.json"
    r = _tool("bench_context_parallel.py", "--resolution", "0", "--rounds", "2", "--steps", "1",
              "--timing-latent", "16x16", "--json", str(path))
    assert r.returncode == 0, r.stderr[-3000:]
    t = json.loads(path.read_text())["step_time"]
    s = t["seconds_per_iteration"]
    assert s["1"] > 0 and s["2"] > 0 and t["rounds"] == 2
    assert "CP=2 / CP=1 =" in r.stdout
