"""torch.compile's on-disk cache, one folder per ATEN_CPU_CAPABILITY (megatron_sd3/compile_cache.py)."""
import os


def test_inductor_cache_has_a_folder_per_cpu_capability(monkeypatch):
    """Kernels cached under one ATEN_CPU_CAPABILITY gave non-finite outputs when loaded under
    another (torch 2.13): each capability gets its own cache folder; a user's choice stands."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from megatron_sd3.compile_cache import use_a_cache_per_cpu_capability

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    use_a_cache_per_cpu_capability()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    use_a_cache_per_cpu_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir() + "_avx2"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/mine")
    use_a_cache_per_cpu_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/mine"
