#!/usr/bin/env python
"""Images + captions -> cached SD3 latents and text embeddings (shards + manifest.json).

    # one process
    python tools/preprocess_data.py --input IMAGES_DIR --output DATA_DIR --sd3-root SD3_DIFFUSERS_DIR
    # all GPUs of a node / a SLURM job: each rank writes its own shards, rank 0 writes the manifest
    torchrun --nproc-per-node 8 tools/preprocess_data.py --input list.jsonl --output DATA_DIR \
        --vae VAE_DIR --clip-l CLIP_L_DIR --clip-g CLIP_G_DIR --t5 T5_DIR --buckets auto --resolution 256

    # sample prompts for pretrain_sd3.py --sample-interval: DATA_DIR/sample_prompts.safetensors with
    # the dataset (add --prompts prompts.txt to the command above), or a standalone file:
    python tools/preprocess_data.py --prompts prompts.txt --output prompts.safetensors --sd3-root SD3_DIR

    # webdataset / img2dataset tars (a tar per work unit, split over the ranks):
    torchrun --nproc-per-node 8 tools/preprocess_data.py --input 'SHARDS/{00000..09999}.tar' --output DATA_DIR ...

The input is a folder (images with same-name .txt captions), a .jsonl/.csv with image, caption[, mask],
or tar shards of KEY.jpg|jpeg|png|webp with KEY.txt and/or KEY.json (--caption-key); samples without a
caption, unreadable images, empty and truncated tars are skipped and listed in the manifest.
Encoders come from local folders only. Stopping and rerunning the same command resumes. Then
``python -m megatron_sd3.data DATA_DIR`` verifies every shard's checksum.
See megatron_sd3/data/preprocess.py for the details.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="image folder with .txt captions, a .jsonl/.csv list, or webdataset tars "
                   "(img2dataset's output): 'SHARDS/{00000..09999}.tar', brace ranges and globs; a tar per work unit")
    p.add_argument("--caption-key", default="caption",
                   help="tar input: the caption's key in KEY.json, used when a sample has no KEY.txt")
    p.add_argument("--output", required=True, help="dataset folder to write (shards/, manifest.json); with "
                   "--prompts and no --input: the prompt-embeddings .safetensors file")
    p.add_argument("--prompts", help="text file (one prompt a line) or .jsonl: their embeddings for sampling, "
                   "written to OUTPUT/sample_prompts.safetensors (or to OUTPUT itself without --input)")
    p.add_argument("--sd3-root", help="diffusers SD3 folder (vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/)")
    p.add_argument("--vae", help="AutoencoderKL folder (overrides --sd3-root)")
    p.add_argument("--clip-l", help="CLIP-L CLIPTextModelWithProjection folder")
    p.add_argument("--clip-g", help="CLIP-G CLIPTextModelWithProjection folder")
    p.add_argument("--t5", help="T5EncoderModel folder")
    p.add_argument("--clip-l-tokenizer", help="default: --clip-l folder (tokenizer/ with --sd3-root)")
    p.add_argument("--clip-g-tokenizer", help="default: --clip-g folder (tokenizer_2/ with --sd3-root)")
    p.add_argument("--t5-tokenizer", help="default: --t5 folder (tokenizer_3/ with --sd3-root)")
    p.add_argument("--resolution", type=int, default=256, help="square side in px (and bucket area for --buckets auto)")
    p.add_argument("--buckets", help="aspect buckets: 'auto' or 'WxH,WxH,...' (each side a multiple of 16 px)")
    p.add_argument("--bucket-step", type=int, default=64, help="width step of --buckets auto")
    p.add_argument("--t5-len", type=int, default=256, help="T5 tokens (the origin: 256)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="stored dtype")
    p.add_argument("--encoder-dtype", choices=["bfloat16", "float16", "float32"],
                   help="encoders' compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--shard-size", type=int, default=256, help="inputs per work unit (a shard per bucket in it)")
    p.add_argument("--batch-size", type=int, default=16, help="encoder batch size")
    p.add_argument("--latent-sampling", default="sample", choices=["sample", "mean"])
    p.add_argument("--seed", type=int, default=0, help="seed of the latent draws")
    p.add_argument("--mask-suffix", help="folder input: mask of foo.jpg is foo<SUFFIX>.png (e.g. _mask)")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--merge-timeout", type=float, default=86400.0, help="rank 0 waits this long for other ranks")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from megatron_sd3.data import preprocess as pp
    from megatron_sd3.data.shards import ShardError

    if a.sd3_root:
        paths = pp.EncoderPaths.from_sd3_root(a.sd3_root, vae=a.vae, clip_l=a.clip_l, clip_g=a.clip_g, t5=a.t5,
                                              clip_l_tokenizer=a.clip_l_tokenizer, clip_g_tokenizer=a.clip_g_tokenizer,
                                              t5_tokenizer=a.t5_tokenizer)
    else:
        missing = [n for n in ("vae", "clip_l", "clip_g", "t5") if getattr(a, n) is None]
        if missing:
            print(f"error: give --sd3-root or all of --vae --clip-l --clip-g --t5 (missing: "
                  f"{', '.join('--' + m.replace('_', '-') for m in missing)})", file=sys.stderr)
            return 2
        paths = pp.EncoderPaths(a.vae, a.clip_l, a.clip_g, a.t5, a.clip_l_tokenizer, a.clip_g_tokenizer, a.t5_tokenizer)
    if not a.input and not a.prompts:
        print("error: give --input (images + captions) and/or --prompts (prompts to encode for sampling)",
              file=sys.stderr)
        return 2
    if not a.input and not a.output.endswith(".safetensors"):
        print(f"error: --prompts without --input writes one file: --output must end in .safetensors, "
              f"got {a.output}", file=sys.stderr)
        return 2
    if not a.input:
        return _prompts_only(a, pp, paths)
    cfg = pp.PreprocessConfig(
        input=a.input, output=a.output, encoders=paths, resolution=a.resolution, buckets=a.buckets,
        bucket_step=a.bucket_step, t5_len=a.t5_len, dtype=a.dtype, encoder_dtype=a.encoder_dtype,
        shard_size=a.shard_size, batch_size=a.batch_size, latent_sampling=a.latent_sampling, seed=a.seed,
        mask_suffix=a.mask_suffix, device=a.device, merge_timeout=a.merge_timeout, quiet=a.quiet,
        caption_key=a.caption_key)
    try:
        m = pp.run(cfg)
    except (pp.EncoderPathError, pp.InputError, ShardError, ValueError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if m is not None:
        print(f"wrote {a.output}: {m['num_samples']} samples, {len(m['shards'])} shards, "
              f"{pp.skipped_summary(m['skipped'])} (listed in manifest.json)")
        if a.prompts:
            return _prompts_only(a, pp, paths, os.path.join(a.output, pp.SAMPLE_PROMPTS_FILE))
    return 0


def _prompts_only(a, pp, paths, out=None) -> int:
    """Encode the --prompts list into one safetensors file (rank 0 of a multi-rank run only)."""
    import torch

    if pp.dist_env()[0] != 0:
        return 0
    out = out or a.output
    try:
        prompts = pp.read_prompt_list(a.prompts)
        device = torch.device(a.device) if a.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from megatron_sd3.data import shards

        dtype = shards.dtype_from_name(a.encoder_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        enc = pp.Encoders(paths, device, dtype, a.t5_len)
        pp.write_prompt_embeds(prompts, enc, out, dtype="float32", batch_size=a.batch_size)
    except (pp.EncoderPathError, pp.InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: embeddings of {len(prompts)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
