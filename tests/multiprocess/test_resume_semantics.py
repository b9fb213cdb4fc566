"""What a resume may change: --text-recon-gamma across 0 (refused in one line, or switched with
--no-load-optim), the global batch size (refused in one line: the data order is keyed by it), and
--exit-interval N (saves and stops at N; the same command without it continues bit-exact)."""
import pytest

from _jobs import metrics_records
from test_checkpoint_integrity import one_error_line, run1

from megatron_sd3.training import checkpointing as ckpt


@pytest.mark.timeout(900)
@pytest.mark.parametrize("saved, resumed", [("0", "0.5"), pytest.param("0.5", "0", marks=pytest.mark.slow)])
def test_gamma_change_across_zero(tmp_path, saved, resumed):
    ck = tmp_path / "ck"
    r = run1(["--train-iters", "2", "--text-recon-gamma", saved, "--save", str(ck)])
    assert r.returncode == 0, r.stderr[-3000:]
    line = one_error_line(run1(["--train-iters", "3", "--text-recon-gamma", resumed, "--load", str(ck)]))
    assert f"trained with text_recon_gamma {float(saved):g} and this run asks for {float(resumed):g}" in line, line
    assert f"resume with --text-recon-gamma {float(saved):g}, or switch with --no-load-optim" in line, line
    m = tmp_path / "m.jsonl"
    r = run1(["--train-iters", "3", "--text-recon-gamma", resumed, "--load", str(ck), "--no-load-optim",
              "--metrics-file", str(m)])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    rec = metrics_records(m)
    assert [x["iteration"] for x in rec] == [3] and (rec[0]["text_recon_loss"] > 0) == (float(resumed) > 0)


@pytest.mark.timeout(900)
def test_global_batch_size_change_is_refused(tmp_path):
    ck = tmp_path / "ck"
    r = run1(["--train-iters", "2", "--save", str(ck)])
    assert r.returncode == 0, r.stderr[-3000:]
    line = one_error_line(run1(["--train-iters", "3", "--global-batch-size", "16", "--load", str(ck)]))
    assert "trained with --global-batch-size 8 and this run asks for 16" in line, line
    assert "resume with --global-batch-size 8" in line, line


@pytest.mark.timeout(900)
def test_exit_interval_cuts_the_run_exactly(tmp_path):
    full_m, cut_m, ck = tmp_path / "full.jsonl", tmp_path / "cut.jsonl", tmp_path / "ck"
    r = run1(["--train-iters", "5", "--metrics-file", str(full_m)])
    assert r.returncode == 0, r.stderr[-3000:]
    same = ["--train-iters", "5", "--save", str(ck), "--load", str(ck), "--metrics-file", str(cut_m)]
    r = run1([*same, "--exit-interval", "3"])
    assert r.returncode == 0 and "stopped: exit-interval at iteration 3/5" in r.stdout, r.stdout[-2000:]
    assert ckpt.read_latest(ck) == 3
    r = run1(same)
    assert r.returncode == 0 and "at iteration 3" in r.stdout, r.stderr[-3000:]
    full = {x["iteration"]: x for x in metrics_records(full_m)}
    cut = metrics_records(cut_m)
    assert [x["iteration"] for x in cut] == [1, 2, 3, 4, 5]
    for x in cut:
        for k in ("loss", "lr", "grad_norm", "consumed_samples"):
            assert x[k] == full[x["iteration"]][k], (x["iteration"], k)
