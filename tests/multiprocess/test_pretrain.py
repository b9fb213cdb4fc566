"""pretrain_sd3.py end to end on CPU ranks: resume equality, layout change, SIGTERM, bad input."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from _ranks import ROOT, free_port, one_process_env, run_ranks, run_script

ENTRY = "pretrain_sd3.py"
BASE = ["--config", "configs/sd3_light_tiny.toml", "--log-interval", "1", "--no-progress", "--lr-decay-iters", "8"]


def _metrics(path):
    with open(path) as fh:
        return {r["iteration"]: r for r in map(json.loads, fh)}


def _train(tmp, name, nproc, args, timeout=300):
    m = os.path.join(tmp, f"{name}.jsonl")
    logs = run_ranks(ENTRY, nproc, [*BASE, *args, "--metrics-file", m], timeout=timeout)
    return _metrics(m), logs


PP2 = ["--pipeline-model-parallel-size", "2"]


def _saved_pp2(tmp, iters):
    """An uninterrupted PP=2 run of ``iters`` iterations saving at iteration 4 (and at its end):
    its metrics by iteration and the checkpoint folder."""
    ck = os.path.join(tmp, "ck")
    full, _ = _train(tmp, "full", 2, [*PP2, "--train-iters", str(iters), "--save", ck, "--save-interval", "4"])
    return full, ck


def _assert_close_to(got, full, iterations=(5, 6)):
    """A resharded resume: the same losses up to the layout's fp32 rounding."""
    for it in iterations:
        assert abs(got[it]["loss"] - full[it]["loss"]) <= 1e-5 * abs(full[it]["loss"]), (it, got[it], full[it])


@pytest.mark.timeout(600)
def test_resume_equals_uninterrupted_and_reshards(tmp_path):
    tmp = str(tmp_path)
    # the uninterrupted run saves at iteration 4 (and 8); the others resume from that checkpoint
    full, ck = _saved_pp2(tmp, 8)
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read().strip() == "8"
    assert os.path.isfile(os.path.join(ck, "effective_config.json"))
    at4 = ["--load", ck, "--ckpt-step", "4"]
    resumed, logs = _train(tmp, "resumed", 2, [*PP2, "--train-iters", "8", *at4])
    assert "resumed from" in logs[0]
    for it in range(5, 9):  # bit-identical continuation, iteration by iteration
        for k in ("loss", "denoise_loss", "text_recon_loss", "lr"):
            assert resumed[it][k] == full[it][k], (it, k, resumed[it][k], full[it][k])
    # the PP=2 checkpoint resumes on one process (TP=PP=1): resharded model and optimizer
    single, logs = _train(tmp, "single", 1, ["--train-iters", "6", *at4])
    assert "differs from this run's" in logs[0]
    _assert_close_to(single, full)
    # ... and on TP=2 (weights and optimizer state split differently): the reshard is exact.
    # Loaded under TP=2 and saved again at once (no iteration left to run), it is the PP=2
    # checkpoint, tensor for tensor (weights, Adam moments, EMA), and the same common state
    # (scheduler, samples consumed) but its layout. The RNG states are not compared: they are kept
    # per rank of a layout. (Training on from an exact state is the layout's arithmetic, which
    # test_parallel.py holds to one process's in float64.)
    resaved = os.path.join(tmp, "ck_tp2")
    _, logs = _train(tmp, "tp2_resave", 2, ["--tensor-model-parallel-size", "2", "--train-iters", "4", *at4,
                                            "--save", resaved])
    assert "resumed from" in logs[0]
    from test_context_parallel import checkpoint_state

    (want, want_common), (got, got_common) = (
        checkpoint_state(os.path.join(d, "iter_0000004"), os.path.join(tmp, f"{name}.pt"))
        for d, name in ((ck, "pp2"), (resaved, "tp2")))
    tensors = sorted(k for k, v in want.items() if isinstance(v, torch.Tensor))
    assert len(tensors) > 100 and tensors == sorted(k for k, v in got.items() if isinstance(v, torch.Tensor))
    for k in tensors:
        assert torch.equal(got[k], want[k]), k
    want_common, got_common = want_common["common"], got_common["common"]
    differ = sorted(k for k in set(want_common) | set(got_common) if want_common.get(k) != got_common.get(k))
    assert differ == ["layout"], (differ, [(want_common.get(k), got_common.get(k)) for k in differ])


@pytest.mark.slow  # a third layout for the same reshard path as above
@pytest.mark.timeout(600)
def test_a_pp2_checkpoint_resumes_with_interleaved_virtual_stages(tmp_path):
    """PP=2 with 2 interleaved virtual stages per rank (model chunks "model0", "model1")."""
    tmp = str(tmp_path)
    full, ck = _saved_pp2(tmp, 6)
    inter, _ = _train(tmp, "vpp", 2, [*PP2, "--num-virtual-stages-per-pipeline-rank", "2",
                                      "--train-iters", "6", "--load", ck, "--ckpt-step", "4"])
    _assert_close_to(inter, full)


@pytest.mark.timeout(300)
def test_logged_tflops_is_the_benchmarks_flop_count(tmp_path):
    """The training log's TFLOP/s counts what tools/bench_throughput.py counts per sample
    (``flops.model_flops_per_sample``: blocks, embedders and head), here on 2 ranks."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_throughput as bt

    from megatron_sd3.config import make_config
    from megatron_sd3.flops import mmdit_io_flops_per_sample

    recs, _ = _train(str(tmp_path), "flops", 2, ["--train-iters", "2"])
    cfg = make_config("tiny", text_recon_gamma=0.5, text_recon_target_layer=0)  # the TOML's model
    bench = bt.flops_per_sample(cfg, 8)  # its mock latents are 8x8
    io = 3 * mmdit_io_flops_per_sample(cfg.hidden_size, cfg.num_image_tokens(8, 8), cfg.text_seq_len,
                                       cfg.patch_size, cfg.in_channels, cfg.joint_attention_dim,
                                       cfg.pooled_projection_dim)
    assert io > 0
    for r in recs.values():
        logged = r["tflops_per_gpu"] * 1e12 * 2 / r["samples_per_sec"]  # FLOPs per sample
        assert logged == pytest.approx(bench, rel=1e-9), (logged, bench, bench - io)


@pytest.mark.timeout(300)
def test_sigterm_saves_and_exits_zero(tmp_path):
    ck = str(tmp_path / "ck")
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    m = str(tmp_path / "m.jsonl")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, ENTRY), *BASE, "--train-iters", "100000",
                          "--save", ck, "--exit-signal-handler", "--metrics-file", m],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(m) and os.path.getsize(m) > 0):
            time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-2000:]
    assert "SIGTERM received" in out
    it = int(open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read())
    assert it >= 1 and os.path.isdir(os.path.join(ck, f"iter_{it:07d}"))


def _run1(args, timeout=120):
    return run_script(ENTRY, args, env=one_process_env(), timeout=timeout)


def _main(argv, capsys):
    """pretrain_sd3's main in this process: bad input fails before any process group exists."""
    from megatron_sd3.training.pretrain import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse-level errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, message", [
    (["--config", "configs/sd3_light_tiny.toml", "--tensor-model-parallel-size", "3"],
     "world size 1 is not divisible by TP x PP"),
    (["--config", "configs/sd3_light_tiny.toml", "--global-batch-size", "7"],
     "global-batch-size 7 is not divisible by micro-batch-size x data-parallel size"),
    (["--config", "configs/sd3_light_tiny.toml", "--text-recon-target-layer", "4"],
     "text_recon_target_layer = 4 gives no meaningful target"),
    (["--config", "configs/sd3_light_tiny.toml", "--load", "/nonexistent/ckpt"], "no checkpoint there"),
    (["--mock-data", "--lr", "1e-3", "--min-lr", "1e-2"], "need 0 <= --min-lr <= --lr"),
    (["--config", "configs/sd3_light_tiny.toml", "--data-path", "x", "--mock-data"], "exactly one data source"),
    (["--mock-data", "--pipeline-model-parallel-size", "1", "--pipeline-layers", "3,1"],
     "--pipeline-layers has 2 entries for 1 pipeline stages"),
    (["--mock-data", "--fp8-format", "hybrid", "--fp8-recipe", "delayed"], "delayed needs --transformer-impl"),
    (["--mock-data", "--fp8-format", "hybrid", "--fp8-recipe", "rowwise"], "use --fp8-format e4m3 with it"),
    (["--mock-data", "--text-recon-gama", "0.5"], "unrecognized arguments"),
    (["--mock-data", "--attention-backend", "fused"], "--attention-backend fused is cuDNN attention"),
])
def test_bad_input_is_one_clear_line(args, message, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, err = _main([*args, "--train-iters", "20"], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.timeout(120)
def test_heads_not_divisible_by_tp(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = _main(["--config", "configs/sd3_light_tiny.toml", "--tensor-model-parallel-size", "3",
                       "--global-batch-size", "2"], capsys)
    assert code == 2 and "num_attention_heads 4 is not divisible by tensor-model-parallel-size 3" in err


@pytest.mark.timeout(120)
def test_bad_toml_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nmicro_batch_sise = 2\n")
    code, err = _main(["--config", str(bad), "--mock-data"], capsys)
    assert code == 2 and "did you mean 'micro_batch_size'" in err
    bad.write_text("[traning]\nlr = 1\n")
    code, err = _main(["--config", str(bad), "--mock-data"], capsys)
    assert code == 2 and "unknown section [traning] (did you mean [training]?)" in err
    bad.write_text("[training]\nlr = 'fast'\n")
    code, err = _main(["--config", str(bad), "--mock-data"], capsys)
    assert code == 2 and "'lr' must be float, got str" in err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_damaged_and_mismatched_checkpoints(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nmicro_batch_sise = 2\n")
    r = _run1(["--config", str(bad), "--mock-data"])
    short = ["--lr-warmup-iters", "0"]
    assert r.returncode == 2 and "did you mean 'micro_batch_size'" in r.stderr
    # a good checkpoint, then damage: a partial later save must not hide it; a wrong model is refused
    ck = tmp_path / "ck"
    r = _run1(["--config", "configs/sd3_light_tiny.toml", *short, "--train-iters", "2", "--save", str(ck)])
    assert r.returncode == 0, r.stderr[-2000:]
    (ck / "iter_0000009.tmp").mkdir()  # an interrupted save of a later iteration
    r = _run1(["--config", "configs/sd3_light_tiny.toml", *short, "--train-iters", "3", "--load", str(ck)])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    r = _run1(["--config", "configs/sd3_light_tiny.toml", *short, "--train-iters", "4", "--load", str(ck),
               "--hidden-size", "32"])
    assert r.returncode == 2 and "model does not match the checkpoint" in r.stderr
    assert "hidden_size: checkpoint 64 vs run 32" in r.stderr
    (ck / "latest_checkpointed_iteration.txt").write_text("7")
    r = _run1(["--config", "configs/sd3_light_tiny.toml", *short, "--train-iters", "8", "--load", str(ck)])
    assert r.returncode == 2 and "iter_0000007/ is missing" in r.stderr


@pytest.mark.slow  # test_overlap.py resumes the same layout bit-exact, with overlap and buckets on
@pytest.mark.timeout(400)
def test_distributed_optimizer_resume_dp2(tmp_path):
    """DP=2 with megatron's distributed optimizer (sharded Adam state): resume equals uninterrupted."""
    tmp, dist_opt = str(tmp_path), ["--use-distributed-optimizer", "--mock-with-mask"]
    full, _ = _train(tmp, "full", 2, [*dist_opt, "--train-iters", "6"])
    ck = os.path.join(tmp, "ck")
    _train(tmp, "first", 2, [*dist_opt, "--train-iters", "4", "--save", ck])
    resumed, _ = _train(tmp, "resumed", 2, [*dist_opt, "--train-iters", "6", "--load", ck])
    for it in (5, 6):
        assert resumed[it]["loss"] == full[it]["loss"], (it, resumed[it], full[it])


@pytest.mark.timeout(200)
def test_nan_losses_are_skipped_then_stop_the_run():
    """An absurd learning rate blows the weights up: NaN iterations are skipped and counted, and
    --max-skipped-iters in a row stops the run with a clear message and a non-zero exit."""
    r = _run1(["--config", "configs/sd3_light_tiny.toml", "--lr", "1e30", "--lr-warmup-iters", "0",
               "--train-iters", "10", "--max-skipped-iters", "3", "--log-interval", "1", "--no-progress"])
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "3 iterations in a row had a NaN/Inf loss" in r.stdout
    assert "skipped iterations: 3" in r.stdout and "stopped: diverged at iteration 4/10" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp", [1, 2])
def test_torch_compile_trains_the_same_numbers(tmp_path, tp):
    """--torch-compile (every joint block compiled; FP8 and the text-recon loss on) trains the
    numbers of the eager run, with the flash attention kernel picked by --attention-backend;
    at TP=1 and TP=2 the FP8 blocks compile without a graph break."""
    tmp = str(tmp_path)
    common = ["--train-iters", "3", "--fp8-format", "hybrid", "--fp8-gemms", "all", "--attention-backend", "flash",
              "--tensor-model-parallel-size", str(tp)]
    eager, _ = _train(tmp, "eager", tp, common)
    compiled, logs = _train(tmp, "compiled", tp, [*common, "--torch-compile"], timeout=500)
    assert "torch.compile: 4 joint blocks" in logs[0]
    graphs = re.search(r"torch.compile: (\d+) graphs compiled, (\d+) graph breaks", logs[0])
    # the four blocks share one forward and one backward graph: FP8 GEMMs break nothing
    assert graphs and (int(graphs.group(1)), int(graphs.group(2))) == (2, 0), logs[0][-3000:]
    for it in (1, 2, 3):
        for k in ("loss", "text_recon_loss"):
            assert abs(compiled[it][k] - eager[it][k]) <= 1e-3 * abs(eager[it][k]), (it, k, compiled[it], eager[it])


@pytest.mark.timeout(300)
def test_fp8_gemms_rule_trains_the_numbers_of_the_gemms_it_keeps(tmp_path):
    """--fp8-format with --fp8-gemms rule (the default): at the tiny widths no GEMM pays, so the
    run trains the numbers of the run without FP8 to fp32 rounding (its declined GEMMs are
    F.linear, as the local backend's, with the bias of the MLP and the row-parallel layers added
    apart: a few ulps, bounded at 1e-6 relative on loss and grad norm after 3 steps);
    --fp8-gemms all puts every block GEMM in FP8 (3-bit mantissas; the zero-initialised adaLN
    gates keep the blocks' share of the loss small in 3 steps: ~6e-5 on the grad norm), more than
    1e-5 away and within 5%."""
    base = ["--config", "configs/sd3_light_tiny.toml", "--mock-data", "--train-iters", "3", "--log-interval", "1",
            "--no-progress", "--lr-warmup-iters", "1"]
    losses = {}
    for name, extra in (("off", []), ("rule", ["--fp8-format", "hybrid"]),
                        ("all", ["--fp8-format", "hybrid", "--fp8-gemms", "all"])):
        metrics = tmp_path / f"{name}.jsonl"
        r = _run1([*base, *extra, "--metrics-file", str(metrics)])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        losses[name] = [row[k] for _, row in sorted(_metrics(metrics).items()) for k in ("loss", "grad_norm")]
    assert len(losses["off"]) == 6
    def gap(name):
        return max(abs(a - b) / abs(b) for a, b in zip(losses[name], losses["off"]))

    print(f"\nlargest relative loss / grad-norm gap to the run without FP8: rule {gap('rule'):.2e}, all {gap('all'):.2e}")
    assert gap("rule") < 1e-6
    assert 1e-5 < gap("all") < 0.05
