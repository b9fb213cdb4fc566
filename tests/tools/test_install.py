"""`pip install` into an environment that already has torch, Transformer Engine and apex (an NGC
PyTorch container, a cluster's CUDA environment) installs none of them, nor torchvision, triton or
CUDA wheels; then the installed package runs there.

A fresh venv gets this environment's torch (its files hard-linked, with the packages torch needs)
and installed-distribution stand-ins for Transformer Engine and apex (a `.dist-info` each, as pip
sees an installed distribution); `pip install .` runs there for real, and then the package. A
second venv holds only stand-ins, with torch at the NGC 25.12 image's pre-release version
(2.10.0a0+...), for pip's plan (--dry-run --report) of docker/Dockerfile's own `pip install ...
.[all]` line: pip must take that torch as installed.
"""
import importlib.metadata as metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"

# What a user's CUDA environment brings and pip must leave alone (normalised names).
KEPT = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton|apex|transformer-engine.*"
                  r"|nvidia-(?!ml-py$|resiliency-ext$).*)$")
STAND_INS = {"transformer_engine": "2.9.0+standin", "transformer_engine_torch": "2.9.0+standin",  # any version
             "apex": "0.1"}
NGC_TORCH = "2.10.0a0+b4e4ee81d3"  # NVIDIA's PyTorch 25.12 release notes


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dockerfile_pip_line() -> list[str]:
    """The arguments after `pip` of the Dockerfile's `RUN pip install ...` line."""
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip().startswith("RUN pip install")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])[2:]


def _stand_in(site: Path, name: str, version: str, requires=()):
    d = site / f"{name}-{version}.dist-info"
    d.mkdir()
    meta = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
            *(f"Requires-Dist: {r}" for r in requires)]
    (d / "METADATA").write_text("\n".join(meta) + "\n")
    (d / "INSTALLER").write_text("stand-in\n")
    (d / "RECORD").write_text("")


def _link_tree(src: Path, dst: Path):
    """Hard-link a package's files (copy where the file system refuses): pip never writes into
    them, and removing one would leave this environment's copy in place."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link, symlinks=True)
    else:
        link(src, dst)


def _requirement_closure(name: str) -> list:
    """The distribution ``name`` and, recursively, what it requires (no extras)."""
    seen, todo = {}, [name]
    while todo:
        n = _norm(todo.pop())
        if n in seen:
            continue
        try:
            dist = metadata.distribution(n)
        except metadata.PackageNotFoundError:
            continue
        seen[n] = dist
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    return list(seen.values())


def _venv(path: Path) -> tuple[Path, Path]:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    py = path / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    return py, site


def _link_dists(site: Path, dists):
    """Put these installed distributions of this environment into ``site`` (a venv's own copy of
    one, its older setuptools say, is replaced)."""
    for dist in dists:
        for old in site.glob(f"{re.sub('-', '_', _norm(dist.metadata['Name']))}-*.dist-info"):
            shutil.rmtree(old)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            src, dst = Path(dist.locate_file(top)), site / top
            if src.exists():
                if dst.is_dir():
                    shutil.rmtree(dst)
                elif dst.exists():
                    dst.unlink()
                _link_tree(src, dst)


def _with_torch(path: Path) -> Path:
    """A venv holding this environment's torch (and what torch needs, setuptools among them), TE
    and apex stand-ins."""
    py, site = _venv(path)
    _link_dists(site, _requirement_closure("torch"))
    for name, version in STAND_INS.items():
        _stand_in(site, name, version)
    return py


def _plan(py: Path, args: list[str], tmp_path: Path) -> list[str]:
    """The distributions `pip install ARGS` would install (pip's --dry-run --report)."""
    report = tmp_path / "report.json"
    args = [a for a in args if a != "--no-cache-dir"]  # a cache option; the cache makes the test fast
    r = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--dry-run",
                        "--report", str(report), *args], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return [_norm(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]]


@pytest.mark.timeout(600)
def test_pip_install_into_a_torch_te_apex_environment_keeps_them_and_runs(tmp_path):
    py = _with_torch(tmp_path / "venv")
    here = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True, timeout=120)
    assert here.returncode == 0, here.stderr[-2000:]
    # `pip install .` for real; its --report is the plan it carried out
    report = tmp_path / "install.json"
    r = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-build-isolation",
                        "--report", str(report), str(ROOT)], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = [_norm(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]]
    assert "megatron-sd3" in plan and "megatron-core" in plan and not [n for n in plan if KEPT.match(n)], plan
    # the installed package runs there (not the checkout: cwd elsewhere)
    r = subprocess.run([str(py), "-m", "megatron_sd3.env"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"{tmp_path / 'venv'}" in r.stdout  # this venv's Python
    import torch

    rows = dict(re.findall(r"^  (\S[^.]*?) \.+ (.*)$", r.stdout, flags=re.M))
    assert rows["torch"].startswith(torch.__version__) and rows["megatron-core"].startswith("0.16"), rows
    # the stand-ins are distributions without code: the report says what a run can use
    assert rows["Transformer Engine"] == "absent" and rows["apex"] == "absent", rows
    where = subprocess.run([str(py), "-c", "import megatron_sd3; print(megatron_sd3.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60).stdout
    assert str(tmp_path / "venv") in where, where


@pytest.mark.timeout(600)
def test_the_dockerfile_line_accepts_ngc_torch_pre_release(tmp_path):
    """NGC images carry torch as a pre-release (2.10.0a0+...): an installed pre-release satisfies
    `torch>=2.6` (megatron-core's and ours), so pip keeps it."""
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", DOCKERFILE.read_text(), flags=re.M)
    py, site = _venv(tmp_path / "venv")
    _link_dists(site, _requirement_closure("setuptools"))  # the image's setuptools is recent too
    _stand_in(site, "torch", NGC_TORCH)
    for name, version in STAND_INS.items():
        _stand_in(site, name, version, requires=["torch"] if name != "apex" else ())
    plan = _plan(py, [a for a in dockerfile_pip_line() if a != "install"], tmp_path)
    assert "megatron-sd3" in plan and "megatron-core" in plan and not [n for n in plan if KEPT.match(n)], plan
    assert {"torchao", "nvidia-resiliency-ext", "webdataset", "transformers", "wandb"} <= set(plan), plan
