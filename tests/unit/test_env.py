"""`python -m megatron_sd3.env [pretrain args]`: the environment report and its refusals.

What the report says is checked against the environment itself (importlib's metadata, torch's
own build flags), so the same tests hold on this CPU machine and on a GPU node with TE and apex.
"""
import importlib.metadata as metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", str(ROOT / "configs" / "sd3_light_tiny.toml"), "--mock-data"]
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
HAVE_APEX = importlib.util.find_spec("amp_C") is not None


def _rows(text: str, block: str) -> dict:
    """The `key ..... value` rows of one block of the report."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if f" {block} " in line and line.startswith("---"))
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("---"):
            break
        key, _, value = line.strip().partition(" ..")
        rows[key] = value.lstrip(". ")
    return rows


def _env_main(argv, capsys, monkeypatch, world="1"):
    from megatron_sd3.env import main

    monkeypatch.setenv("WORLD_SIZE", world)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.timeout(120)
def test_the_command_names_every_package_and_what_the_run_uses():
    """The command as a user runs it: exit 0, nothing on stderr (no third-party notices), every
    package with its installed version or `absent`, and this machine's fallbacks with reasons."""
    r = subprocess.run([sys.executable, "-m", "megatron_sd3.env", *TINY], cwd=ROOT, capture_output=True,
                       text=True, timeout=110, env={**os.environ, "WORLD_SIZE": "1"})
    assert r.returncode == 0, r.stderr
    assert not r.stderr.strip(), r.stderr
    env = _rows(r.stdout, "environment")
    assert env["torch"].startswith(torch.__version__)
    assert env["Python"].startswith(".".join(map(str, sys.version_info[:3])))
    for label, dist in (("megatron-core", "megatron-core"), ("torchao", "torchao"),
                        ("nvidia-resiliency-ext", "nvidia-resiliency-ext"), ("webdataset", "webdataset"),
                        ("diffusers", "diffusers"), ("wandb", "wandb")):
        try:
            want = metadata.version(dist)
        except metadata.PackageNotFoundError:
            want = "absent"
        assert env[label] == want, (label, env[label], want)
    assert (env["Transformer Engine"] == "absent") == (not HAVE_TE), env
    assert (env["apex"] == "absent") == (not HAVE_APEX), env
    run = _rows(r.stdout, "this run")
    assert run["world size"].startswith("1 = TP 1 x PP 1 x CP 1 x DP 1"), run
    assert run["transformer impl"].startswith("local: "), run
    assert run["FP8"].startswith("off"), run
    if not torch.cuda.is_available():
        assert "GPUs" in env and env["GPUs"].startswith("none"), env
        assert "(CPU build: no CUDA)" in env["torch"] or "CUDA" in env["torch"]
        # torch's own pick for the tiny preset's heads on CPU: its flash kernel
        assert "FlashAttention (CPU kernel) for float32, 4 heads of 16 per rank" in run["attention"], run
        assert run["precision"].startswith("fp32"), run
    if not HAVE_TE and not HAVE_APEX:  # the fallbacks, each with its reason
        assert run["optimizer"].startswith("torch AdamW") and "neither TE's nor apex's FusedAdam" in run["optimizer"]
        assert run["grad norm, multi-tensor"].startswith("torch _foreach kernels") and "neither" in \
            run["grad norm, multi-tensor"]


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed here")
def test_transformer_engine_without_te_is_one_line(capsys, monkeypatch):
    code, out, err = _env_main([*TINY, "--transformer-impl", "transformer_engine"], capsys, monkeypatch)
    assert code == 2 and not out.strip(), out
    assert len(err.strip().splitlines()) == 1 and "needs NVIDIA Transformer Engine, which is not installed" in err


def test_fp8_on_a_gpu_below_sm89_is_one_line(capsys, monkeypatch):
    """An A100 (sm_80) has no FP8 tensor cores: --fp8-format is refused before any rank starts,
    by the report and by pretrain_sd3.py's own checks alike; an H100 (sm_90) is accepted."""
    import megatron_sd3.env as env_mod
    from megatron_sd3.training.pretrain import main

    a100 = dict(name="NVIDIA A100-SXM4-80GB", memory_gib=79.2, capability=(8, 0), fp8=False)
    h100 = dict(name="NVIDIA H100 80GB HBM3", memory_gib=79.1, capability=(9, 0), fp8=True)
    monkeypatch.setattr(env_mod, "gpus", lambda: [a100, a100])
    code, out, err = _env_main([*TINY, "--fp8-format", "hybrid"], capsys, monkeypatch)
    assert code == 2 and not out.strip()
    assert len(err.strip().splitlines()) == 1, err
    assert "compute capability 8.9 or newer" in err and "NVIDIA A100-SXM4-80GB is sm_80" in err, err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main([*TINY, "--fp8-format", "hybrid", "--check-config"]) == 2
    assert "is sm_80" in capsys.readouterr().err
    assert env_mod.fp8_device_problem([h100]) is None
    assert env_mod.fp8_device_problem([]) is None  # CPU: torch's _scaled_mm CPU kernel runs it
    assert "FP8 yes" in env_mod.gpu_line([h100]) and "2 x NVIDIA A100" in env_mod.gpu_line([a100, a100])


def test_the_run_block_follows_the_flags(capsys, monkeypatch):
    code, out, err = _env_main([*TINY, "--attention-backend", "unfused", "--fp8-format", "e4m3",
                                "--fp8-recipe", "rowwise", "--use-distributed-optimizer",
                                "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"],
                               capsys, monkeypatch, world="4")
    assert code == 0, err
    run = _rows(out, "this run")
    assert run["world size"].startswith("4 = TP 1 x PP 2 x CP 1 x DP 2"), run
    assert "--attention-backend unfused: math (unfused)" in run["attention"], run
    assert run["FP8"].startswith("e4m3") and "torchao rowwise" in run["FP8"], run
    assert "distributed optimizer" in run["optimizer"], run
    assert run["FP8 GEMMs"].startswith("rule, modelled on H100 at micro batch 2 and 8x8 latents"), run
    assert run["FP8 GEMMs"].endswith("none pays, every GEMM bf16 (12 shapes; --fp8-gemms all forces FP8)"), run
    code, out, err = _env_main(TINY, capsys, monkeypatch)
    assert "plain optimizer" in _rows(out, "this run")["optimizer"]
    assert "FP8 GEMMs" not in _rows(out, "this run")
    code, out, err = _env_main([*TINY, "--fp8-format", "hybrid", "--fp8-gemms", "all"], capsys, monkeypatch)
    assert _rows(out, "this run")["FP8 GEMMs"] == "all joint-block GEMMs (--fp8-gemms all)"


def test_the_fp8_gemms_row_names_what_the_rule_moves_to_fp8(capsys, monkeypatch):
    """At a width where the model says the large image GEMMs pay, the report names them and keeps
    the text stream's and the modulation's in bf16."""
    code, out, err = _env_main(["--preset", "sd3_light", "--mock-data", "--fp8-format", "hybrid", "--hidden-size",
                                "16384", "--num-attention-heads", "256", "--micro-batch-size", "4"],
                               capsys, monkeypatch)
    assert code == 0, err
    line = _rows(out, "this run")["FP8 GEMMs"]
    fp8, kept = line.split("FP8 for ")[1].split("; bf16 for ")
    assert {"image.fc1", "image.fc2", "image.qkv"} <= set(fp8.split(", ")), line
    assert {"image.modulation", "text.modulation"} <= set(kept.split(", ")), line


def test_without_flags_only_the_environment(capsys, monkeypatch):
    code, out, err = _env_main([], capsys, monkeypatch)
    assert code == 0 and " environment " in out and " this run " not in out


def test_check_config_prints_the_report_after_its_checks(capsys, monkeypatch):
    """`pretrain_sd3.py --check-config` (what launch.sh runs once before the ranks): the report on
    stdout once the checks pass; nothing on stdout when they fail."""
    from megatron_sd3.training.pretrain import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*TINY, "--check-config", "--pipeline-model-parallel-size", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.count(" environment ") == 1 and _rows(out.out, "this run")["world size"].startswith("2 = ")
    assert "checks passed" in out.err
    assert main([*TINY, "--check-config", "--tensor-model-parallel-size", "4"]) == 2
    out = capsys.readouterr()
    assert not out.out.strip() and "not divisible" in out.err


def test_a_preset_without_patch_size_passes_the_checks(capsys, monkeypatch, tmp_path):
    """The sd3_light preset leaves patch_size at the model's default (2): the bucket check reads it
    from there."""
    code, out, err = _env_main(["--config", str(ROOT / "configs" / "sd3_light.toml"), "--mock-data",
                                "--save", str(tmp_path / "ckpt")], capsys, monkeypatch, world="2")
    assert code == 0, err
    assert "24 heads of 64 per rank" in _rows(out, "this run")["attention"]


def test_te_attention_line_is_megatrons_own_mapping(monkeypatch):
    """The report's TE attention line comes from megatron-core's mapping of --attention-backend
    (run in a copy of the environment): `local` turns all three TE kernels off, a conflicting
    NVTE_* already set is megatron's refusal, and the caller's environment is left as it was."""
    from megatron_sd3.env import te_attention_env

    for v in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        monkeypatch.delenv(v, raising=False)
    assert te_attention_env("local") == "NVTE_FLASH_ATTN=0 NVTE_FUSED_ATTN=0 NVTE_UNFUSED_ATTN=0"
    assert te_attention_env("flash") == "NVTE_FLASH_ATTN=1 NVTE_FUSED_ATTN=0 NVTE_UNFUSED_ATTN=0"
    assert te_attention_env("auto") == "NVTE_FLASH_ATTN=1 NVTE_FUSED_ATTN=1 NVTE_UNFUSED_ATTN=1"
    assert "NVTE_FLASH_ATTN" not in os.environ
    monkeypatch.setenv("NVTE_FLASH_ATTN", "0")
    assert te_attention_env("flash").startswith("refused by megatron-core: NVTE_FLASH_ATTN set to 0")
    assert os.environ["NVTE_FLASH_ATTN"] == "0"
