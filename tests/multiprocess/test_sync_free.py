"""The training step does not wait on the device: a count of host reads of tensors per iteration.

On the CPU every tensor is a "device" tensor, so the count hooks the calls that would make the
host wait on a GPU (``Tensor.item``, ``__float__``, ``__int__``, ``__bool__``, ``tolist``,
``cpu``, ``numpy``, ``torch.cuda.synchronize``) through a ``TorchFunctionMode`` and attributes
each to the first caller outside torch: this package, megatron-core, or the test. On a GPU
the same budget is checked with ``torch.cuda.set_sync_debug_mode("error")`` (``tools/gpu_check.sh``).

Budget per iteration: 0 reads in the microbatches (forward step and loss function), 1 read of
ours per iteration (the finite-loss flag that decides the skip), megatron-core's own: 1
(gradient clipping's ``get_grad_norm_fp32`` reads the norm; ``finalize_model_grads`` would test
``num_tokens > 0``, but the step divides by the sample count it knows instead). ``torch.optim``'s reads of its host-side
step counts (non-fused Adam on the CPU; the fused CUDA kernel keeps them on the device and
reads nothing) are not counted against it.
"""
import os
import sys
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ (_ranks)

READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__complex__", "cpu", "numpy"}
_TORCH_DIR = os.path.dirname(torch.__file__)


def _ranks_root() -> str:
    from _ranks import ROOT

    return ROOT


def _origin() -> tuple[str, str]:
    """(who, file:line) of the first frame outside torch and this module; reads inside
    ``torch.optim`` are its own (the step counts of non-fused Adam, host tensors on a GPU)."""
    f = sys._getframe(2)
    in_optim = False
    while f is not None and (f.f_code.co_filename.startswith(_TORCH_DIR) or f.f_code.co_filename == __file__):
        in_optim |= f.f_code.co_filename.startswith(os.path.join(_TORCH_DIR, "optim"))
        f = f.f_back
    if f is None:
        return "other", "?"
    path = f.f_code.co_filename
    if in_optim:
        return "torch.optim", f"{os.path.relpath(path)}:{f.f_lineno}"
    who = "ours" if f"{os.sep}megatron_sd3{os.sep}" in path else (
        "megatron" if f"{os.sep}megatron{os.sep}core{os.sep}" in path else "other")
    return who, f"{os.path.relpath(path)}:{f.f_lineno}"


class SyncCounter(TorchFunctionMode):
    """Counts host reads of tensors (by origin) while active; ``in_microbatch`` those made
    inside ``TrainStep._forward_step`` / ``_loss_func``."""

    def __init__(self):
        super().__init__()
        self.by_origin = Counter()
        self.where = Counter()
        self.in_microbatch = 0

    def _record(self, name):
        who, where = _origin()
        self.by_origin[who] += 1
        self.where[f"{who} {name} {where}"] += 1
        f = sys._getframe(1)
        while f is not None:
            if f.f_code.co_name in ("_forward_step", "_loss_func") and "step.py" in f.f_code.co_filename:
                self.in_microbatch += 1
                break
            f = f.f_back

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in READS:
            self._record(func.__name__)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._sync = torch.cuda.synchronize

        def counted(*a, **k):
            self._record("cuda.synchronize")
            return self._sync(*a, **k)

        torch.cuda.synchronize = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.cuda.synchronize = self._sync
        return super().__exit__(*exc)


def _batch(cfg, n, mbs=2, seed=0, hw=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [{"latents": torch.randn(mbs, cfg.in_channels, *hw, generator=g),
             "prompt_embeds": torch.randn(mbs, cfg.text_seq_len, cfg.joint_attention_dim, generator=g),
             "pooled_prompt_embeds": torch.randn(mbs, cfg.pooled_projection_dim, generator=g)} for _ in range(n)]


@pytest.fixture
def train_step(single_process):
    from megatron_sd3.config import make_config
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.step import TrainStep

    cfg = make_config("tiny", zero_init_adaln=False, text_recon_gamma=0.5)
    built = build_training(cfg, optimizer=dict(lr=1e-3, clip_grad=1.0))
    step = TrainStep(cfg, built.ddp, built.optimizer, global_batch_size=8, micro_batch_size=2, seed=3)
    yield cfg, step, built
    built.free()


def test_counter_sees_host_reads():
    t = torch.ones(3)
    with SyncCounter() as c:
        float(t.sum()), t.tolist(), bool(t[0] > 0), t.max().item()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    assert c.by_origin["other"] == 4 + torch.cuda.is_available(), c.where


def test_train_step_reads_the_host_once_per_iteration(train_step):
    cfg, step, _ = train_step
    step(_batch(cfg, step.num_microbatches), 0)  # first iteration: lazy initialisation
    with SyncCounter() as c:
        res = step(_batch(cfg, step.num_microbatches, seed=1), 8)
    assert not res.skipped
    assert c.in_microbatch == 0, c.where  # nothing per microbatch
    assert c.by_origin["ours"] <= 1, c.where  # the finite-loss flag
    assert c.by_origin["megatron"] <= 1, c.where  # clipping's norm
    assert c.by_origin["other"] == 0, c.where
    # the losses stay on the device until asked for: one read then, none after
    with SyncCounter() as c:
        losses = res.losses
        again = res.losses
    assert sum(c.by_origin.values()) == 1 and again is losses
    assert list(losses) == ["loss", "denoise_loss", "text_recon_loss"]
    assert losses["loss"] == pytest.approx(losses["denoise_loss"] + 0.5 * losses["text_recon_loss"], rel=1e-12)


def test_forward_only_step_reads_nothing(single_process):
    from megatron_sd3.config import make_config
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.step import TrainStep

    cfg = make_config("tiny", zero_init_adaln=False)
    built = build_training(cfg, optimizer=dict(lr=1e-3))
    try:
        step = TrainStep(cfg, built.ddp, built.optimizer, global_batch_size=4, micro_batch_size=2, seed=3,
                         forward_only=True)
        step(_batch(cfg, 2), 0)
        with SyncCounter() as c:
            step(_batch(cfg, 2, seed=1), 4)
        assert sum(c.by_origin.values()) == 0, c.where
    finally:
        built.free()


def test_nan_loss_still_skips_the_update(train_step):
    """The one host read is what keeps the NaN/Inf skip: no update, grads cleared."""
    cfg, step, built = train_step
    before = [p.detach().clone() for m in built.models for p in m.parameters()]
    batch = _batch(cfg, step.num_microbatches)
    batch[1]["latents"][0, 0, 0, 0] = float("nan")
    res = step(batch, 0)
    assert res.skipped and res.grad_norm is None and res.losses["loss"] != res.losses["loss"]
    after = [p.detach() for m in built.models for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    res = step(_batch(cfg, step.num_microbatches, seed=2), 8)  # a finite one updates again
    assert not res.skipped and res.grad_norm is not None and res.grad_norm > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs a GPU")
def test_train_step_under_cuda_sync_debug_mode(train_step):
    """On a GPU: no synchronising call in the microbatches, found by CUDA itself."""
    cfg, step, _ = train_step
    step(_batch(cfg, step.num_microbatches), 0)
    batch = [{k: v.pin_memory() for k, v in mb.items()} for mb in _batch(cfg, step.num_microbatches, seed=1)]
    calls = Counter()
    orig = step._forward_step

    def checked(*a, **k):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return orig(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            calls["mb"] += 1

    step._forward_step = checked
    res = step(batch, 8)
    assert calls["mb"] == step.num_microbatches and not res.skipped


# -- CUDA graphs: the flag and its refusals (the capture itself runs on a GPU) -------------------
def _main(argv, capsys):
    from megatron_sd3.training.pretrain import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--torch-compile-mode", "reduce-overhead"], "is a mode of torch.compile; add --torch-compile"),
    (["--torch-compile-mode", "graphs"], "--torch-compile-mode"),
    (["--torch-compile", "--torch-compile-mode", "reduce-overhead"],
     None if torch.cuda.is_available() else "captures CUDA graphs and needs a CUDA GPU"),
    (["--cuda-graph-impl", "local"], "use --torch-compile --torch-compile-mode reduce-overhead"),
    (["--cuda-graph-impl", "none"], None),
])
def test_compile_mode_refusals_are_one_line(extra, message, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    code, err = _main(["--config", "configs/sd3_light_tiny.toml", "--mock-data", "--check-config", *extra], capsys)
    if message is None:
        assert code == 0, err
        return
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_compile_mode_rules():
    from megatron_sd3.config import ConfigError
    from megatron_sd3.training.build import check_compile_mode

    check_compile_mode("default", torch_compile=False)
    check_compile_mode("max-autotune-no-cudagraphs", torch_compile=True, cuda=False)
    check_compile_mode("reduce-overhead", torch_compile=True, cuda=True)
    with pytest.raises(ConfigError, match="cannot capture Transformer Engine layers"):
        check_compile_mode("reduce-overhead", torch_compile=True, transformer_impl="transformer_engine", cuda=True)


def test_compile_mode_reaches_every_block(single_process, monkeypatch):
    """``build_training(torch_compile_mode=...)`` hands the mode to each block's torch.compile."""
    from megatron_sd3.config import make_config
    from megatron_sd3.training.build import build_training

    seen = []
    real = torch.compile

    def recording(fn=None, **kw):
        seen.append(kw.get("mode"))
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", recording)
    cfg = make_config("tiny")
    built = build_training(cfg, optimizer=dict(lr=1e-3), torch_compile=True,
                           torch_compile_mode="max-autotune-no-cudagraphs")
    try:
        assert built.compiled_blocks == cfg.num_layers
        assert seen == ["max-autotune-no-cudagraphs"] * cfg.num_layers
    finally:
        built.free()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_reduce_overhead_training_matches_default(single_process):
    """On a GPU: two iterations with the blocks replayed as CUDA graphs give the default
    mode's losses."""
    from megatron_sd3.config import make_config
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.step import TrainStep

    out = {}
    for mode in ("default", "reduce-overhead"):
        cfg = make_config("tiny", zero_init_adaln=False)
        built = build_training(cfg, optimizer=dict(lr=1e-3), torch_compile=True, torch_compile_mode=mode)
        step = TrainStep(cfg, built.ddp, built.optimizer, global_batch_size=4, micro_batch_size=2, seed=3,
                         cuda_graphs=mode == "reduce-overhead")
        out[mode] = [step(_batch(cfg, 2, seed=i), 4 * i).losses["loss"] for i in range(3)]
        built.free()
    assert out["reduce-overhead"] == pytest.approx(out["default"], rel=1e-4)


# -- PP=2 (two processes): the same budget on both stages ----------------------------------------
def _pp2_worker(out_dir):
    """Run as a rank of ``run_ranks``: TP=1, PP=2, one warm-up iteration, then one counted."""
    import json

    from megatron_sd3.config import make_config
    from megatron_sd3.distributed import initialize_distributed
    from megatron_sd3.training.build import build_training
    from megatron_sd3.training.parallel_layout import pipeline_config_fields
    from megatron_sd3.training.step import TrainStep

    info = initialize_distributed(1, 2, seed=1234)
    cfg = make_config("tiny", zero_init_adaln=False, text_recon_gamma=0.5,
                      parallel=dict(pipeline_model_parallel_size=2, **pipeline_config_fields(4, 2, None)))
    built = build_training(cfg, optimizer=dict(lr=1e-3, clip_grad=1.0))
    step = TrainStep(cfg, built.ddp, built.optimizer, global_batch_size=8, micro_batch_size=2, seed=3)
    step(_batch(cfg, step.num_microbatches), 0)
    with SyncCounter() as c:
        res = step(_batch(cfg, step.num_microbatches, seed=1), 8)
    rec = {"by_origin": dict(c.by_origin), "in_microbatch": c.in_microbatch, "where": dict(c.where),
           "skipped": res.skipped, "loss": res.losses["loss"]}
    with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w") as fh:
        json.dump(rec, fh)


@pytest.mark.timeout(600)
def test_pipeline_stages_keep_the_budget(tmp_path):
    import json

    from _ranks import run_ranks

    run_ranks(os.path.relpath(__file__, _ranks_root()), 2,
              ["--pp2-worker", str(tmp_path)], timeout=500)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["loss"] == ranks[1]["loss"] and not any(r["skipped"] for r in ranks)
    for r in ranks:
        assert r["in_microbatch"] == 0, r["where"]
        assert r["by_origin"].get("ours", 0) <= 1, r["where"]
        assert r["by_origin"].get("megatron", 0) <= 1, r["where"]
        assert r["by_origin"].get("other", 0) == 0, r["where"]


# -- the training loop reads the losses at log intervals only ------------------------------------
def _loop_worker(out_dir):
    """pretrain_sd3's main with a count of the StepResults whose losses the host read."""
    import json

    from megatron_sd3.training import pretrain, step

    reads = []
    prop = step.StepResult.losses

    def counted(self):
        if self._losses is None:
            reads.append(1)
        return prop.fget(self)

    step.StepResult.losses = property(counted)
    code = pretrain.main(["--config", "configs/sd3_light_tiny.toml", "--mock-data", "--train-iters", "6",
                          "--log-interval", "3", "--global-batch-size", "4", "--micro-batch-size", "2",
                          "--metrics-file", os.path.join(out_dir, "metrics.jsonl")])
    with open(os.path.join(out_dir, "loop.json"), "w") as fh:
        json.dump({"code": code, "reads": len(reads)}, fh)


@pytest.mark.timeout(600)
def test_training_loop_reads_losses_at_log_intervals(tmp_path):
    import json

    from _ranks import run_ranks

    logs = run_ranks(os.path.relpath(__file__, _ranks_root()), 1,
                     ["--loop-worker", str(tmp_path)], timeout=500)
    d = json.load(open(tmp_path / "loop.json"))
    assert d["code"] == 0, logs[0][-2000:]
    assert d["reads"] == 2  # iterations 3 and 6 of 6, not every iteration
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [3, 6] and all(r["loss"] > 0 for r in rows)
    assert "(first) ->" in logs[0]  # the summary still has the first and last loss


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] in ("--pp2-worker", "--loop-worker"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    (_pp2_worker if sys.argv[1] == "--pp2-worker" else _loop_worker)(sys.argv[2])


class LaunchCounter:
    """Counts the aten operators a training step dispatches that would each launch a kernel on a
    GPU (views and detaches launch none), split into ``optimizer`` (inside ``optimizer.step``:
    gradient norm, clipping, the update, the master-weight copies) and ``rest``."""

    def __init__(self, optimizer):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.counts, self.phase, self.optimizer = Counter(), "rest", optimizer
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not func.is_view and func.overloadpacket is not torch.ops.aten.detach:
                    counter.counts[counter.phase] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self._step = self.optimizer.step

        def step(*a, **k):
            self.phase = "optimizer"
            try:
                return self._step(*a, **k)
            finally:
                self.phase = "rest"

        self.optimizer.step = step
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.optimizer.step = self._step


def _optimizer_launches(num_layers: int, adam: str) -> tuple[int, int]:
    """Launches in one step's ``optimizer.step`` of the tiny model with ``num_layers`` blocks, torch
    AdamW as ``adam`` (``foreach``: megatron's fallback without apex/TE; ``fused``: what
    ``build_optimizer`` makes of it on a GPU, ``use_fused_torch_adam``); and the parameter count."""
    from megatron_sd3.config import make_config
    from megatron_sd3.training.build import build_training, use_fused_torch_adam
    from megatron_sd3.training.step import TrainStep

    cfg = make_config("tiny", num_layers=num_layers, zero_init_adaln=False)
    built = build_training(cfg, optimizer=dict(lr=1e-3, clip_grad=1.0))
    if adam == "fused":
        assert use_fused_torch_adam(built.optimizer, device_types=("cpu",)) == 1
    else:
        for group in built.optimizer.optimizer.param_groups:
            group["fused"], group["foreach"] = False, True
    step = TrainStep(cfg, built.ddp, built.optimizer, global_batch_size=4, micro_batch_size=2, seed=3)
    step(_batch(cfg, 2), 0)
    with LaunchCounter(built.optimizer) as c:
        assert not step(_batch(cfg, 2, seed=1), 4).skipped
    params = sum(1 for _ in built.chunks[0].parameters())
    built.free()
    return c.counts["optimizer"], params


def test_the_optimizer_step_launches_a_handful_of_kernels_whatever_the_parameter_count(single_process):
    """The host-side cost of an update: with torch's fused AdamW (the GPU path) and the multi-
    tensor grad norm (training/multi_tensor.py), one optimizer step launches the same handful of
    kernels for 2 blocks as for 4 (13); megatron's foreach fallback grows with the parameter
    count (167 and 263 here)."""
    fused2, p2 = _optimizer_launches(2, "fused")
    fused4, p4 = _optimizer_launches(4, "fused")
    foreach2, _ = _optimizer_launches(2, "foreach")
    foreach4, _ = _optimizer_launches(4, "foreach")
    print(f"launches in optimizer.step: fused AdamW {fused2} (2 blocks, {p2} parameters), {fused4} (4 blocks, "
          f"{p4} parameters); megatron's foreach fallback {foreach2}, {foreach4}")
    assert p4 > p2
    assert fused2 == fused4 <= 16, (fused2, fused4)
    assert foreach4 > foreach2 > 5 * fused2, (foreach2, foreach4)
