#!/usr/bin/env python
"""Judge latents of the compositional task (``--mock-task compositional``) without the model.

    python tools/judge_compositional.py --self-check --json    # one line: truth, shuffled, chance
    python tools/judge_compositional.py RUN/checkpoints/samples/iter_0000600.safetensors [--json]
    python tools/judge_compositional.py --write-prompts prompts.safetensors --n 64   # then:
    python tools/generate.py --load RUN/checkpoints --prompt-embeds prompts.safetensors \
        --output-latents samples.safetensors --latent-size 16x16
    python tools/judge_compositional.py samples.safetensors --scenes prompts.safetensors

Each quadrant of a latent is decoded to empty or a (colour, shape) by the nearest rendered
template (``megatron_sd3.data.compositional``); a latent follows its caption when both objects are
right and the other quadrants empty. A sample file is what a training run's sample grid writes
beside its image under ``--mock-task compositional``: ``latents`` ``[N, C, H, W]`` and
``scene_index`` ``[N]`` (each caption's row in the task's scene list), or ``tools/generate.py``'s
``--output-latents`` with ``--scenes`` naming the prompt file ``--write-prompts`` made (its
``scene_index``: ``--n`` captions of seen pairs, then ``--n`` with a held-out pair, embedded for
the model's text widths ``--text-len``, ``--text-dim``, ``--pooled-dim``). Printed: the share that
follows, on seen and on held-out pairs, and per object its position, colour and shape.

``--self-check`` judges the task's own latents (rendered scenes plus the training noise, half of
them with a held-out pair) against their captions (``truth``: the judge reads the task right when
this is 1) and against other samples' captions (``shuffled``), beside ``chance``: the share a
caption drawn at random from the training scenes would give.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sd3.data._seeding import generator  # noqa: E402
from megatron_sd3.data.compositional import NOISE, CompositionalTask  # noqa: E402


def self_check(n: int, channels: int, size: int, seed: int) -> dict:
    task = CompositionalTask(channels, text_len=16, text_dim=8, pooled_dim=8)  # the text is not read
    g = generator(seed, "judge-self-check")
    scenes = [task.draw(g) for _ in range(n)] + [task.draw_held_out(g) for _ in range(n)]
    latents = torch.stack([task.render(s, size, size) + NOISE * torch.randn(channels, size, size, generator=g)
                           for s in scenes])
    truth = task.judge(latents, scenes)
    shuffled = task.judge(latents, scenes[1:] + scenes[:1])
    return {"truth": truth["following"], "truth_seen": truth["following_seen"],
            "truth_held_out": truth["following_held_out"], "shuffled": shuffled["following"],
            "chance": task.chance(), "samples": len(scenes), "latent": f"{channels}x{size}x{size}"}


def _read(path: str, keys: tuple) -> dict:
    from safetensors.torch import load_file

    try:
        t = load_file(path)
    except Exception as e:  # a damaged or foreign file: one line
        raise SystemExit(f"judge_compositional.py: cannot read {path} as safetensors ({e})")
    missing = [k for k in keys if k not in t]
    if missing:
        raise SystemExit(f"judge_compositional.py: {path} holds {sorted(t)}, not {missing}; give a sample file "
                         f"of a --mock-task compositional run, or generate.py's latents with --scenes PROMPTS")
    return t


def write_prompts(path: str, n: int, seed: int, text_len: int, text_dim: int, pooled_dim: int,
                  channels: int) -> dict:
    from safetensors.torch import save_file

    task = CompositionalTask(channels, text_len, text_dim, pooled_dim)
    text, pooled, scenes = task.prompts(n, seed)
    save_file({"prompt_embeds": text, "pooled_prompt_embeds": pooled,
               "scene_index": torch.tensor([s.index() for s in scenes])}, path)
    return {"prompts": path, "seen": n, "held_out": n}


def judge_file(path: str, scenes_path: str | None = None) -> dict:
    t = _read(path, ("latents",) if scenes_path else ("latents", "scene_index"))
    lat = t["latents"]
    idx = (_read(scenes_path, ("scene_index",)) if scenes_path else t)["scene_index"].long()
    task = CompositionalTask(lat.shape[1], text_len=16, text_dim=8, pooled_dim=8)
    if idx.numel() != lat.shape[0] or int(idx.min()) < 0 or int(idx.max()) >= len(task.scenes):
        raise SystemExit(f"judge_compositional.py: {path}: scene_index must hold one index in "
                         f"[0, {len(task.scenes)}) per latent")
    out = task.judge(lat, [task.scenes[i] for i in idx.tolist()])
    out.pop("follows")
    return {**out, "samples": int(lat.shape[0])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("samples", nargs="?", help="a sample file (safetensors: latents, scene_index)")
    ap.add_argument("--self-check", action="store_true", help="judge the task's own latents")
    ap.add_argument("--json", action="store_true", help="one JSON line")
    ap.add_argument("--scenes", help="the prompt file (--write-prompts) whose scene_index the samples follow")
    ap.add_argument("--write-prompts", metavar="PATH", help="write --n seen and --n held-out captions' embeddings")
    ap.add_argument("--n", type=int, default=512, help="scenes of each kind (seen, held-out)")
    ap.add_argument("--channels", type=int, default=16, help="latent channels")
    ap.add_argument("--size", type=int, default=16, help="--self-check: latent side")
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--text-dim", type=int, default=32)
    ap.add_argument("--pooled-dim", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if sum(map(bool, (a.self_check, a.samples, a.write_prompts))) != 1:
        ap.error("give one of: a sample file, --self-check, --write-prompts PATH")
    if a.self_check:
        out = self_check(a.n, a.channels, a.size, a.seed)
    elif a.write_prompts:
        out = write_prompts(a.write_prompts, a.n, a.seed, a.text_len, a.text_dim, a.pooled_dim, a.channels)
    else:
        out = judge_file(a.samples, a.scenes)
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:20s} {v:.4f}" if isinstance(v, float) else f"{k:20s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
