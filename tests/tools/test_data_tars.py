"""webdataset / img2dataset tars through tools/preprocess_data.py: PNG, JPEG and WebP with txt and json
captions, and the bad inputs users meet (a truncated image, a sample without a caption, an empty
tar, a truncated tar): every good sample exactly once, the bad ones named in the manifest and
counted in one line, a dataset that verifies and trains under PP=2, and a rank killed mid-run then
the same command again giving byte-identical shards."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sd3.data import verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _data_fixtures import build_tiny_sd3_encoders, make_tar_shards, train_pp2_on  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "preprocess_data.py"
COMMON = ["--resolution", "64", "--buckets", "64x64,96x48,48x96", "--t5-len", "16", "--batch-size", "2"]


def _env(**kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _start(tars, out, enc, world=2, extra=()):
    return [subprocess.Popen([sys.executable, str(TOOL), "--input", f"{tars}/{{00000..00005}}.tar", "--output",
                              str(out), "--sd3-root", str(enc), *COMMON, *extra],
                             env=_env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]


def _wait(procs, timeout=200):
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return logs


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    base = tmp_path_factory.mktemp("tars")
    enc = build_tiny_sd3_encoders(base / "sd3")
    folder, expected = make_tar_shards(base / "shards")
    out = base / "data"
    logs = _wait(_start(folder, out, enc))
    return {"enc": enc, "folder": folder, "expected": expected, "out": out, "logs": logs}


def _sources(m, out):
    from safetensors import safe_open

    got = []
    for e in m["shards"]:
        with safe_open(str(out / e["file"]), framework="pt") as f:
            got += json.loads(f.metadata()["sources"])
    return got


@pytest.mark.timeout(300)
def test_every_good_sample_once_and_the_bad_ones_named(tars):
    out, expected = tars["out"], tars["expected"]
    m = verify(out)  # sizes, headers and sha256 of every shard
    got = _sources(m, out)
    assert sorted(got) == sorted(expected["good"]) and len(got) == len(set(got)) == m["num_samples"] == 11
    named = {(e.get("key") and f"{e['tar']}#{e['key']}") or e["tar"]: e["reason"] for e in m["skipped"]}
    assert set(named) == set(expected["skipped"]), named
    for where, word in expected["skipped"].items():
        assert named[where].startswith(word), (where, named[where])
    assert "tar" in m["skipped"][0] and m["num_skipped"] == 4
    line = [x for x in tars["logs"][0].splitlines() if x.startswith("wrote ")]
    assert line == [f"wrote {out}: 11 samples, {len(m['shards'])} shards, 4 skipped (1 no caption, 1 unreadable image, "
                    f"1 empty tar, 1 truncated tar) (listed in manifest.json)"], line
    # the work was split by tar: rank 1 did the odd tars
    assert "[preprocess rank 1] tar " in tars["logs"][1] and "00001.tar" in tars["logs"][1]
    assert "samples/s" in tars["logs"][0]
    # a json-only caption is the json's "caption"
    from safetensors import safe_open

    caps = []
    for e in m["shards"]:
        with safe_open(str(out / e["file"]), framework="pt") as f:
            caps += json.loads(f.metadata()["captions"])
    assert "a picture number 1 of" in " ".join(caps)


@pytest.mark.slow  # the format is the folder input's: test_data_preprocess.py trains PP=2 on it
@pytest.mark.timeout(300)
def test_pretrain_pp2_on_the_tars_dataset(tars, tmp_path):
    rows = train_pp2_on(tars["out"], tmp_path, 2, ["--train-small-buckets"])
    assert [r["iteration"] for r in rows] == [1, 2]


@pytest.mark.timeout(400)
def test_a_rank_killed_mid_run_then_the_same_command_gives_identical_shards(tars, tmp_path):
    out = tmp_path / "data"
    procs = _start(tars["folder"], out, tars["enc"], extra=("--merge-timeout", "600"))
    deadline = time.time() + 200
    while not (out / "units" / "u000001.json").exists():  # rank 1 finished its first tar ...
        assert time.time() < deadline and procs[1].poll() is None, "rank 1 ended before its first tar"
        time.sleep(0.005)
    procs[1].send_signal(signal.SIGKILL)  # ... and dies in the middle of the next one (or after it)
    procs[0].send_signal(signal.SIGKILL)  # the launcher takes the job down
    for p in procs:
        p.communicate(timeout=60)
    assert not (out / "manifest.json").exists()
    _wait(_start(tars["folder"], out, tars["enc"]))
    ref = json.loads((tars["out"] / "manifest.json").read_text())
    again = json.loads((out / "manifest.json").read_text())
    assert [e["file"] for e in again["shards"]] == [e["file"] for e in ref["shards"]]
    for e in ref["shards"]:
        assert (out / e["file"]).read_bytes() == (tars["out"] / e["file"]).read_bytes(), e["file"]
    assert again["skipped"] == ref["skipped"]
    verify(out)


def test_the_two_input_readers_share_their_types_without_importing_each_other():
    """The folder/list reader (data/preprocess.py) and the tar reader (data/tar_input.py) take
    ``InputError`` and ``InputItem`` from data/inputs.py: importing either loads not the other."""
    code = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith('megatron_sd3.data.')))")
    loaded = {}
    for mod in ("megatron_sd3.data.tar_input", "megatron_sd3.data.preprocess"):
        r = subprocess.run([sys.executable, "-c", code, mod], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        loaded[mod] = r.stdout.strip().splitlines()[-1]
    assert "megatron_sd3.data.preprocess'" not in loaded["megatron_sd3.data.tar_input"]
    assert "megatron_sd3.data.tar_input'" not in loaded["megatron_sd3.data.preprocess"]
    from megatron_sd3.data import inputs, preprocess, tar_input

    assert preprocess.InputError is tar_input.InputError is inputs.InputError
    assert preprocess.InputItem is tar_input.InputItem is inputs.InputItem
