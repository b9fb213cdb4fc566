#!/usr/bin/env python
"""Generate samples from a checkpoint: SD3's flow-matching Euler sampler with classifier-free guidance.

    # prompts -> PNGs (one per prompt) and a grid, encoded and decoded with the local SD3 encoders/VAE
    python tools/generate.py --load ckpt --prompts prompts.txt --sd3-root SD35M --output-dir samples \\
        --steps 28 --cfg-scale 7 --shift 3 --seed 0 --latent-size 32x32 [--ema] [--clip-model CLIP_DIR]
    # precomputed text embeddings -> latents only (no encoders, no VAE)
    python tools/generate.py --load ckpt --prompt-embeds embeds.safetensors --output-latents out.safetensors
    # any TP/PP layout, whatever layout saved the checkpoint
    torchrun --nproc-per-node 4 tools/generate.py ... --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

``--prompts``: a text file (one prompt a line) or a .jsonl with a ``prompt``/``caption``/``text`` field.
``--prompt-embeds``: safetensors with ``prompt_embeds [N,T,D]`` and ``pooled_prompt_embeds [N,P]``.
Sample ``i`` starts from noise seeded with ``--seed + i`` (diffusers' pipeline draws the same with
``generator=[torch.Generator().manual_seed(seed + i) ...]``); ``--noise FILE`` (tensor ``noise [N,C,h,w]``)
replaces it. ``--output-latents`` writes ``latents [N,C,h,w]`` and the starting ``noise``, so that file
reproduces the samples elsewhere as ``--noise``. Processes beyond TP x PP split the prompts (data parallel).
"""
import argparse
import json
import math
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=UserWarning)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class GenerateError(ValueError):
    """Bad input; the message names the problem and the fix."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (pretrain_sd3.py --save, or converted)")
    p.add_argument("--ema", action="store_true", help="sample with the checkpoint's EMA weights")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file, one prompt a line (or .jsonl with a prompt field)")
    src.add_argument("--prompt-embeds", help="safetensors with prompt_embeds [N,T,D] and pooled_prompt_embeds [N,P]")
    p.add_argument("--sd3-root", help="diffusers SD3 folder (vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/)")
    p.add_argument("--encoder-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="text encoders and VAE (default as preprocessing: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--output-dir", help="PNGs, grid.png and samples.json (with --prompts)")
    p.add_argument("--output-latents", help="safetensors: latents [N,C,h,w] and the starting noise")
    p.add_argument("--noise", help="safetensors with noise [N,C,h,w]: replaces the seeded starting noise")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance scale (<= 1: none)")
    p.add_argument("--shift", type=float, default=3.0, help="timestep shift of the flow-matching scheduler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent-size", default=None, help="HxW of the latents (default: the model's sample_size)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="rows per forward pass (a guided step runs 2N rows); default: all at once")
    p.add_argument("--clip-model", default=None, help="local transformers CLIPModel folder: CLIP score of the PNGs")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--context-parallel-size", type=int, default=1,
                   help="ranks each sample's image tokens are split over (all-to-all attention over heads)")
    return p


def parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        assert h > 0 and w > 0
    except Exception:
        raise GenerateError(f"--latent-size must look like 32x32 (latent HxW), got {text!r}") from None
    return h, w


def read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise GenerateError(f"--prompts {path}: file not found")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    row = json.loads(line)
                except ValueError:
                    raise GenerateError(f"--prompts {path}: line {n} is not JSON") from None
                text = next((row[k] for k in ("prompt", "caption", "text") if row.get(k)), None)
                if text is None:
                    raise GenerateError(f"--prompts {path}: line {n} has no prompt/caption/text field")
                prompts.append(str(text).strip())
            else:
                prompts.append(line.strip())
    if not prompts:
        raise GenerateError(f"--prompts {path}: no prompts in the file")
    return prompts


def read_tensors(path: str, flag: str, names: list[str]) -> dict:
    if not os.path.isfile(path):
        raise GenerateError(f"{flag} {path}: file not found")
    from safetensors.torch import load_file

    try:
        t = load_file(path)
    except Exception as e:
        raise GenerateError(f"{flag} {path}: not a safetensors file ({str(e).splitlines()[0][:200]})") from None
    missing = [n for n in names if n not in t]
    if missing:
        raise GenerateError(f"{flag} {path}: tensor(s) {missing} missing (has {sorted(t)})")
    return {n: t[n].float() for n in names}


def validate(a) -> None:
    if a.prompts and not a.sd3_root:
        raise GenerateError("--prompts needs --sd3-root DIR (the local SD3 text encoders and VAE)")
    if a.prompts and not a.output_dir:
        raise GenerateError("--prompts needs --output-dir DIR for the PNGs")
    if a.prompt_embeds and not a.output_latents:
        raise GenerateError("--prompt-embeds needs --output-latents FILE.safetensors")
    if a.clip_model and not a.prompts:
        raise GenerateError("--clip-model scores decoded images against their prompts; it needs --prompts")
    if a.clip_model and not os.path.isfile(os.path.join(a.clip_model, "config.json")):
        raise GenerateError(f"--clip-model {a.clip_model}: no config.json there; give a local transformers "
                            f"CLIPModel folder (CLIPModel.save_pretrained + CLIPProcessor.save_pretrained)")
    if a.steps < 1:
        raise GenerateError(f"--steps must be >= 1, got {a.steps}")
    if a.shift <= 0:
        raise GenerateError(f"--shift must be > 0, got {a.shift}")
    if a.micro_batch_size is not None and a.micro_batch_size < 1:
        raise GenerateError(f"--micro-batch-size must be >= 1, got {a.micro_batch_size}")
    if a.latent_size:
        parse_hw(a.latent_size)
    tp, pp, cp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.context_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or pp < 1 or cp < 1 or world % (tp * pp * cp):
        raise GenerateError(f"run with a multiple of TP x PP x CP = {tp} x {pp} x {cp} processes (torchrun), "
                            f"got {world}")


def prepare_inputs(a, cfg, device):
    """Rank 0: text embeddings (file or encoders), starting noise, prompts; the encoders (for
    decoding) and the CLIP scorer are loaded here, so a bad path fails before sampling."""
    import torch

    from megatron_sd3.sampling import seeded_noise

    enc, prompts = None, None
    if a.prompt_embeds:
        t = read_tensors(a.prompt_embeds, "--prompt-embeds", ["prompt_embeds", "pooled_prompt_embeds"])
        embeds, pooled = t["prompt_embeds"], t["pooled_prompt_embeds"]
    else:
        from megatron_sd3.data.preprocess import EncoderPaths, Encoders

        prompts = read_prompts(a.prompts)
        clip_len = 77  # SD3's CLIP length; the T5 part fills the rest of the model's text length
        if cfg.text_seq_len <= clip_len:
            raise GenerateError(f"the model's text_seq_len {cfg.text_seq_len} leaves no T5 tokens after "
                                f"{clip_len} CLIP tokens: this checkpoint was not trained on SD3 text")
        dtype = getattr(torch, a.encoder_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        enc = Encoders(EncoderPaths.from_sd3_root(a.sd3_root), device, dtype, t5_len=cfg.text_seq_len - clip_len)
        embeds, pooled = enc.encode_prompts(prompts)
        embeds, pooled = embeds.float().cpu(), pooled.float().cpu()
    n = embeds.shape[0]
    want = (cfg.text_seq_len, cfg.joint_attention_dim)
    if embeds.dim() != 3 or tuple(embeds.shape[1:]) != want:
        raise GenerateError(f"prompt embeddings are {tuple(embeds.shape)}, the model wants [N, {want[0]}, {want[1]}] "
                            f"(text_seq_len, joint_attention_dim); encode with the model's text settings")
    if tuple(pooled.shape) != (n, cfg.pooled_projection_dim):
        raise GenerateError(f"pooled embeddings are {tuple(pooled.shape)}, the model wants "
                            f"[{n}, {cfg.pooled_projection_dim}]")
    hw = parse_hw(a.latent_size) if a.latent_size else (cfg.sample_size, cfg.sample_size)
    if a.noise:
        noise = read_tensors(a.noise, "--noise", ["noise"])["noise"]
        if noise.dim() != 4 or noise.shape[0] != n or noise.shape[1] != cfg.in_channels:
            raise GenerateError(f"--noise {a.noise}: noise is {tuple(noise.shape)}, expected [{n}, {cfg.in_channels}, h, w] "
                                f"(one per prompt, the model's latent channels)")
        if a.latent_size and tuple(noise.shape[-2:]) != hw:
            raise GenerateError(f"--noise is {noise.shape[-2]}x{noise.shape[-1]} but --latent-size says "
                                f"{hw[0]}x{hw[1]}; drop --latent-size")
        hw = tuple(noise.shape[-2:])
    else:
        noise = seeded_noise(a.seed, n, (cfg.in_channels, *hw))
    if hw[0] % cfg.patch_size or hw[1] % cfg.patch_size:
        raise GenerateError(f"latent size {hw[0]}x{hw[1]} must be a multiple of the patch size {cfg.patch_size}")
    if max(hw) > cfg.pos_embed_max_size * cfg.patch_size:
        raise GenerateError(f"latent size {hw[0]}x{hw[1]} exceeds the model's position table "
                            f"({cfg.pos_embed_max_size * cfg.patch_size} per side); use a smaller --latent-size")
    scorer = None
    if a.clip_model:
        from megatron_sd3.clip_score import CLIPScorer

        scorer = CLIPScorer(a.clip_model, device)
    return {"embeds": embeds, "pooled": pooled, "noise": noise, "prompts": prompts}, (enc, scorer)


def save_pngs(images, out_dir: str) -> list[str]:
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = os.path.join(out_dir, f"{i:04d}.png")
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = images.shape[-2:]
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(Image.fromarray(im.permute(1, 2, 0).numpy()), ((i % cols) * w, (i // cols) * h))
    grid.save(os.path.join(out_dir, "grid.png"))
    return paths


def run(a) -> int:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_sd3.distributed import destroy_distributed, initialize_distributed
    from megatron_sd3.sampling import build_inference_model, sample

    info = initialize_distributed(a.tensor_model_parallel_size, a.pipeline_model_parallel_size, seed=a.seed,
                                  cp=a.context_parallel_size)
    rank0 = dist.get_rank() == 0
    try:
        chunks, cfg, common = build_inference_model(a.load, ema=a.ema)
        # rank 0 reads / encodes; everyone learns the inputs or the error (no rank left waiting)
        payload, tools = [None], (None, None)
        if rank0:
            try:
                inputs, tools = prepare_inputs(a, cfg, info.device)
                payload = [inputs]
            except Exception as e:
                from megatron_sd3.clip_score import ClipModelError
                from megatron_sd3.data.preprocess import EncoderPathError

                if not isinstance(e, (GenerateError, EncoderPathError, ClipModelError)):
                    raise
                payload = [{"error": str(e)}]
        dist.broadcast_object_list(payload, src=0)
        inputs = payload[0]
        if "error" in inputs:
            raise GenerateError(inputs["error"])
        n = inputs["noise"].shape[0]
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per = -(-n // dp)  # every DP rank samples the same count (the last pads with copies of prompt 0)
        idx = [i if i < n else 0 for i in range(dp_rank * per, (dp_rank + 1) * per)]
        latents = sample(chunks, inputs["embeds"][idx], inputs["pooled"][idx], inputs["noise"][idx],
                         steps=a.steps, cfg_scale=a.cfg_scale, shift=a.shift, micro_batch_size=a.micro_batch_size)
        if dp > 1:
            parts = [torch.empty_like(latents) for _ in range(dp)]
            dist.all_gather(parts, latents.contiguous(), group=ps.get_data_parallel_group())
            latents = torch.cat(parts)
        latents = latents[:n].cpu()
        if rank0:
            write_outputs(a, inputs, latents, *tools, common=common)
        dist.barrier()
    finally:
        destroy_distributed()
    return 0


def write_outputs(a, inputs, latents, enc, scorer, common) -> None:
    summary = {"load": a.load, "iteration": common.get("iteration"), "ema": a.ema, "steps": a.steps,
               "cfg_scale": a.cfg_scale, "shift": a.shift, "seed": None if a.noise else a.seed,
               "noise": a.noise, "latent_size": list(latents.shape[-2:])}
    if a.output_latents:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(a.output_latents)), exist_ok=True)
        save_file({"latents": latents.contiguous(), "noise": inputs["noise"].contiguous()}, a.output_latents)
        print(f"wrote {a.output_latents} (latents {list(latents.shape)})")
    if enc is not None:
        from megatron_sd3.sampling import decode_latents

        images = decode_latents(enc.vae, latents, enc.scaling_factor, enc.shift_factor)
        paths = save_pngs(images, a.output_dir)
        summary["samples"] = [{"prompt": p, "png": os.path.basename(f),
                               "seed": None if a.noise else a.seed + i}
                              for i, (p, f) in enumerate(zip(inputs["prompts"], paths))]
        if scorer is not None:
            per = scorer.scores(list(images), inputs["prompts"])
            for s, v in zip(summary["samples"], per.tolist()):
                s["clip_score"] = v
            summary["clip_score"] = scorer.score(list(images), inputs["prompts"])
            print(f"CLIP score {summary['clip_score']:.2f} over {len(images)} samples")
        with open(os.path.join(a.output_dir, "samples.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {len(paths)} PNGs and grid.png to {a.output_dir}")


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from megatron_sd3.clip_score import ClipModelError
    from megatron_sd3.config import ConfigError
    from megatron_sd3.data.preprocess import EncoderPathError
    from megatron_sd3.training.checkpointing import CheckpointError
    from megatron_sd3.training.parallel_layout import LayoutError

    try:
        validate(a)
        return run(a)
    except (GenerateError, ConfigError, CheckpointError, LayoutError, EncoderPathError, ClipModelError) as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # dist_checkpointing may spawn workers: keep the guard
    sys.exit(main())
