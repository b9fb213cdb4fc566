"""The tests' ranks are forks of one interpreter that has done the imports (tests/_rank_zygote.py,
tests/README.md): each must start as ``python script.py`` would, end with the status Python would
give, leave nothing behind on a timeout, and train the same numbers as a fresh interpreter."""
import json
import os
import shutil
import subprocess
import time

import pytest
import torch

from _ranks import ROOT, one_process_env, rank_envs, run_processes, run_ranks, run_script

PROBE = "tests/_zygote_probe.py"


def _state(out):
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def test_a_forked_rank_starts_as_a_fresh_interpreter_would_and_ends_with_its_status(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = str(tmp_path / "elsewhere" / "probe.py")  # sys.path[0]: its folder, not the zygote's
    os.makedirs(os.path.dirname(script))
    shutil.copy(os.path.join(ROOT, PROBE), script)
    results = run_processes(script, ["ok"], rank_envs(2), timeout=120)
    assert [code for code, _ in results] == [0, 0]
    states = [_state(out) for _, out in results]
    for r, s in enumerate(states):
        assert s["preloaded"], "not forked from the zygote"
        assert s["rank"] == str(r) and s["argv"] == [script, "ok"] and s["main_file"] == script
        assert s["path0"] == os.path.dirname(script) and s["cwd"] == str(tmp_path)
    assert [c for c, _ in run_processes(PROBE, ["exit3"], rank_envs(1), timeout=120)] == [3]
    [(code, out)] = run_processes(PROBE, ["raise"], rank_envs(1), timeout=120)
    assert code == 1 and "ValueError: the probe raised" in out
    # run_script: subprocess.run's form, stdout and stderr apart, in the folder asked for
    r = run_script(PROBE, ["raise"], env=one_process_env(), cwd=ROOT)
    assert r.returncode == 1 and _state(r.stdout)["preloaded"] and _state(r.stdout)["cwd"] == ROOT
    assert "ValueError: the probe raised" in r.stderr and "ValueError" not in r.stdout


def test_a_variable_read_at_import_is_read_at_import():
    """megatron_sd3's import derives torch.compile's cache folder from ATEN_CPU_CAPABILITY
    (megatron_sd3/compile_cache.py): a run under another value gets a zygote that imported under it."""
    env = {k: v for k, v in one_process_env().items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    plain = run_script(PROBE, ["ok"], env=env)
    avx2 = run_script(PROBE, ["ok"], env=dict(env, ATEN_CPU_CAPABILITY="avx2"))
    assert plain.returncode == avx2.returncode == 0, plain.stderr + avx2.stderr
    plain, avx2 = _state(plain.stdout), _state(avx2.stdout)
    assert plain["preloaded"] and avx2["preloaded"]
    assert not (plain["inductor_cache"] or "").endswith("_avx2") and avx2["inductor_cache"].endswith("_avx2")


def test_a_timeout_ends_the_run_and_all_it_started(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        run_processes(PROBE, ["hang", str(tmp_path / "child")], rank_envs(2), timeout=15)
    children = [int((tmp_path / f"child{r}").read_text()) for r in range(2)]
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in children):
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{p}") for p in children)


@pytest.mark.timeout(300)
def test_forked_ranks_train_the_numbers_of_fresh_interpreters(tmp_path, monkeypatch):
    args = ["--tp", "2", "--gamma", "0.5", "--steps", "2"]
    (tmp_path / "forked").mkdir()
    (tmp_path / "fresh").mkdir()
    run_ranks("tests/_parallel_worker.py", 2, [*args, "--out", str(tmp_path / "forked")], timeout=240)
    monkeypatch.setenv("SD3_TEST_FRESH_RANKS", "1")
    run_ranks("tests/_parallel_worker.py", 2, [*args, "--out", str(tmp_path / "fresh")], timeout=240)
    for r in range(2):
        a, b = (torch.load(tmp_path / d / f"rank{r}.pt") for d in ("forked", "fresh"))
        assert a["losses"] == b["losses"] and a["grad_norms"] == b["grad_norms"]
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in b["params"])
