"""Images + captions -> cached VAE latents and SD3 text embeddings, in shards (the logic behind
``tools/preprocess_data.py``).

Pipeline for one image ``(path, caption[, mask])``:

- the image is opened with Pillow (RGB); unreadable files are *skipped* and listed in the manifest;
- it goes to the aspect bucket (pixel ``(H, W)``, sides multiples of 16) whose aspect ratio is nearest to
  its own (one bucket = one fixed resolution), is resized to cover the bucket (Lanczos) and centre-cropped;
- latents: ``AutoencoderKL.encode(pixels in [-1, 1])``, then a draw of the latent distribution with a
  generator keyed by ``(seed, input index)`` (``latent_sampling="sample"``, the default, like diffusers'
  SD3 training scripts) or its mean (``"mean"``), then ``(z - shift_factor) * scaling_factor`` from the
  VAE config;
- text: exactly ``StableDiffusion3Pipeline.encode_prompt`` (no CFG, no clip skip): CLIP-L and CLIP-G
  penultimate hidden states (77 tokens, padded to the tokenizer's max length) concatenated on the feature
  axis, zero-padded to the T5 width, concatenated on the token axis with T5's last hidden state
  (``t5_len`` tokens); pooled = CLIP-L ``text_embeds`` ‖ CLIP-G ``text_embeds``;
- an optional mask image (grey levels, 255 = keep) gets the same resize/crop, then an area-average down
  to the latent resolution, as float in [0, 1].

Work is split into *units* of ``shard_size`` consecutive inputs; unit ``u`` is done by rank
``u % world_size`` (RANK/WORLD_SIZE from torchrun, or SLURM_PROCID/SLURM_NTASKS), which writes one shard per
bucket present in the unit and then ``units/uNNNNNN.json``. A restart skips units whose record and shards
exist, whatever the number of ranks. Rank 0 then waits for all unit records (file markers: no process
group needed) and writes ``manifest.json``. See :mod:`megatron_sd3.data.shards` for the format.

Sample prompts (``--prompts FILE``): :func:`write_prompt_embeds` encodes a prompt list with the same
text encoders into one safetensors file, ``prompt_embeds [N, T, D]`` and ``pooled_prompt_embeds
[N, P]`` with the prompt texts in its metadata (``"prompts"``, a JSON list): the sample grid of
``pretrain_sd3.py --sample-interval`` (``DATA/sample_prompts.safetensors``, or ``--sample-prompts``)
and ``tools/generate.py --prompt-embeds`` read it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_sd3.data import shards as _shards
from megatron_sd3.data.inputs import InputError, InputItem  # noqa: F401  (also this module's API)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class EncoderPathError(FileNotFoundError):
    """An encoder or tokenizer path is missing or not in diffusers/transformers format (one-line message)."""


# ----------------------------------------------------------------------------------------------------------
# inputs (InputError, InputItem: data/inputs.py, shared with the tar reader)


def list_inputs(source: str | os.PathLike, mask_suffix: str | None = None) -> tuple[list[InputItem], list[dict]]:
    """Read the input: a folder (images with same-name ``.txt`` captions, recursively, sorted) or a
    ``.jsonl`` / ``.csv`` list with columns ``image`` (or ``image_path``/``path``/``file_name``), ``caption``
    (or ``text``/``prompt``) and optional ``mask``; relative paths are relative to the list's folder.
    Returns ``(items, skipped)``; ``skipped`` lists inputs without a caption."""
    src = Path(source)
    items: list[InputItem] = []
    skipped: list[dict] = []
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        masks = set()
        if mask_suffix:
            masks = {p for p in files if p.stem.endswith(mask_suffix)}
        for p in files:
            if p in masks:
                continue
            cap = p.with_suffix(".txt")
            if not cap.exists():
                skipped.append({"path": str(p), "reason": "no caption file " + cap.name})
                continue
            mask = None
            if mask_suffix:
                cands = [m for m in masks if m.parent == p.parent and m.stem == p.stem + mask_suffix]
                mask = str(cands[0]) if cands else None
            items.append(InputItem(str(p), cap.read_text(encoding="utf-8", errors="replace").strip(), mask))
        return items, skipped
    if not src.exists():
        raise InputError(f"input {src}: does not exist")
    rows: list[dict] = []
    if src.suffix.lower() in (".jsonl", ".json"):
        with open(src, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise InputError(f"input {src}: line {n} is not JSON ({e})") from None
    elif src.suffix.lower() in (".csv", ".tsv"):
        with open(src, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if src.suffix.lower() == ".tsv" else ","))
    else:
        raise InputError(f"input {src}: expected a folder, a .jsonl or a .csv file")

    def pick(row, names):
        for k in names:
            if row.get(k) not in (None, ""):
                return str(row[k])
        return None

    for row in rows:
        img = pick(row, ("image", "image_path", "path", "file_name", "file"))
        cap = pick(row, ("caption", "text", "prompt"))
        mask = pick(row, ("mask", "mask_path"))
        if img is None:
            raise InputError(f"input {src}: a row has no image column ({sorted(row)})")
        img_p = Path(img) if os.path.isabs(img) else src.parent / img
        if cap is None:
            skipped.append({"path": str(img_p), "reason": "no caption"})
            continue
        mask_p = None if mask is None else str(Path(mask) if os.path.isabs(mask) else src.parent / mask)
        items.append(InputItem(str(img_p), cap.strip(), mask_p))
    return items, skipped


# ----------------------------------------------------------------------------------------------------------
# buckets and image transforms


def parse_buckets(resolution: int | None = None, buckets: str | None = None, bucket_step: int = 64) -> list[tuple[int, int]]:
    """Pixel ``(H, W)`` buckets. ``buckets``: ``"WxH,WxH,..."`` (width x height) or ``"auto"`` (area about
    ``resolution**2``, aspect 1:2 .. 2:1, widths every ``bucket_step`` px); else the square ``resolution``."""
    if buckets is None or buckets == "":
        if not resolution:
            raise ValueError("give a resolution or buckets")
        out = [(int(resolution), int(resolution))]
    elif buckets == "auto":
        if not resolution:
            raise ValueError("--buckets auto needs --resolution")
        area, out = resolution * resolution, []
        w = max(16, (resolution // 2) // 16 * 16)
        while w <= 2 * resolution:
            h = int(area / w) // 16 * 16
            if h >= 16 and 0.5 <= w / h <= 2.0 and (h, w) not in out:
                out.append((h, w))
            w += bucket_step
        if (resolution, resolution) not in out:
            out.append((resolution, resolution))
    else:
        out = []
        for part in buckets.split(","):
            try:
                w, h = (int(v) for v in part.lower().strip().split("x"))
            except ValueError:
                raise ValueError(f"bad bucket {part!r}: expected WIDTHxHEIGHT, e.g. 320x192") from None
            out.append((h, w))
    for h, w in out:
        if h % 16 or w % 16 or h <= 0 or w <= 0:
            raise ValueError(f"bucket {w}x{h}: each side must be a positive multiple of 16 px")
    return sorted(set(out), key=lambda hw: (hw[1] / hw[0], hw))


def choose_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log space) to ``width / height``."""
    r = math.log(width / height)
    return min(range(len(buckets)), key=lambda b: (abs(math.log(buckets[b][1] / buckets[b][0]) - r), b))


def resize_crop(img, height: int, width: int, resample):
    """Resize ``img`` (PIL) to cover ``(height, width)`` and centre-crop it."""
    w0, h0 = img.size
    s = max(width / w0, height / h0)
    nw, nh = max(width, round(w0 * s)), max(height, round(h0 * s))
    img = img.resize((nw, nh), resample=resample)
    left, top = (nw - width) // 2, (nh - height) // 2
    return img.crop((left, top, left + width, top + height))


def load_image(path: str, data: bytes | None = None):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data) if data is not None else path) as im:
        im.load()
        return im.convert("RGB")


def image_to_tensor(img) -> torch.Tensor:
    import numpy as np

    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # [H, W, 3]
    return a.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def mask_to_latent(path: str, height: int, width: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        m = resize_crop(im.convert("L"), height, width, Image.Resampling.BILINEAR)
    t = torch.from_numpy(np.asarray(m, dtype=np.uint8).copy()).float().div_(255.0)
    return torch.nn.functional.interpolate(t[None, None], size=latent_hw, mode="area")[0, 0]


# ----------------------------------------------------------------------------------------------------------
# encoders


@dataclass
class EncoderPaths:
    vae: str
    clip_l: str
    clip_g: str
    t5: str
    clip_l_tokenizer: str | None = None
    clip_g_tokenizer: str | None = None
    t5_tokenizer: str | None = None

    @classmethod
    def from_sd3_root(cls, root: str, **override) -> "EncoderPaths":
        """The standard diffusers SD3 layout: vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/."""
        r = Path(root)
        p = cls(str(r / "vae"), str(r / "text_encoder"), str(r / "text_encoder_2"), str(r / "text_encoder_3"),
                str(r / "tokenizer"), str(r / "tokenizer_2"), str(r / "tokenizer_3"))
        for k, v in override.items():
            if v is not None:
                setattr(p, k, v)
        return p

    def check(self):
        names = {"vae": "VAE", "clip_l": "CLIP-L text encoder", "clip_g": "CLIP-G text encoder", "t5": "T5 encoder"}
        for k, what in names.items():
            p = Path(getattr(self, k))
            if not p.is_dir():
                raise EncoderPathError(f"{what}: {p} does not exist (expected a local diffusers/transformers folder)")
            if not (p / "config.json").exists():
                raise EncoderPathError(f"{what}: {p} has no config.json (expected a diffusers/transformers folder)")
        for k, what in (("clip_l", "CLIP-L tokenizer"), ("clip_g", "CLIP-G tokenizer"), ("t5", "T5 tokenizer")):
            p = Path(getattr(self, k + "_tokenizer") or getattr(self, k))
            if not p.is_dir() or not any((p / f).exists() for f in (
                    "tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")):
                raise EncoderPathError(f"{what}: no tokenizer files in {p}")


class Encoders:
    """The SD3 VAE and three text encoders, loaded from local folders only (no hub access)."""

    def __init__(self, paths: EncoderPaths, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, t5_len: int = 256):
        paths.check()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as dlog
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel
        from transformers.utils import logging as tlog

        for lg in (dlog, tlog):  # no "install accelerate" / per-model progress bars in the progress log
            lg.set_verbosity_error()
            lg.disable_progress_bar()

        def load(what, fn, path, **kw):
            try:
                return fn(path, local_files_only=True, **kw)
            except Exception as e:  # one line, naming the path
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise EncoderPathError(f"{what}: cannot load {path} ({msg})") from None

        self.paths, self.device, self.dtype, self.t5_len = paths, torch.device(device), dtype, int(t5_len)
        self.vae = load("VAE", AutoencoderKL.from_pretrained, paths.vae, torch_dtype=dtype)
        self.clip_l = load("CLIP-L text encoder", CLIPTextModelWithProjection.from_pretrained, paths.clip_l, torch_dtype=dtype)
        self.clip_g = load("CLIP-G text encoder", CLIPTextModelWithProjection.from_pretrained, paths.clip_g, torch_dtype=dtype)
        self.t5 = load("T5 encoder", T5EncoderModel.from_pretrained, paths.t5, torch_dtype=dtype)
        self.tok_l = load("CLIP-L tokenizer", AutoTokenizer.from_pretrained, paths.clip_l_tokenizer or paths.clip_l)
        self.tok_g = load("CLIP-G tokenizer", AutoTokenizer.from_pretrained, paths.clip_g_tokenizer or paths.clip_g)
        self.tok_t5 = load("T5 tokenizer", AutoTokenizer.from_pretrained, paths.t5_tokenizer or paths.t5)
        for m in (self.vae, self.clip_l, self.clip_g, self.t5):
            m.to(self.device).eval().requires_grad_(False)
        cfg = self.vae.config
        self.shift_factor = float(cfg.get("shift_factor", 0.0) or 0.0)
        self.scaling_factor = float(cfg.get("scaling_factor", 1.0))
        self.latent_channels = int(cfg.get("latent_channels"))
        self.vae_scale_factor = 2 ** (len(cfg.get("block_out_channels")) - 1)
        ml = self.tok_l.model_max_length
        self.clip_len = int(ml) if ml and ml < 100000 else 77
        self.text_dim = int(self.t5.config.d_model)
        self.pooled_dim = int(self.clip_l.config.projection_dim + self.clip_g.config.projection_dim)
        self.text_len = self.clip_len + self.t5_len

    def info(self) -> dict:
        return {
            "paths": asdict(self.paths),
            "classes": {"vae": type(self.vae).__name__, "clip_l": type(self.clip_l).__name__,
                        "clip_g": type(self.clip_g).__name__, "t5": type(self.t5).__name__},
            "shift_factor": self.shift_factor, "scaling_factor": self.scaling_factor,
            "vae_scale_factor": self.vae_scale_factor, "clip_len": self.clip_len, "t5_len": self.t5_len,
            "encoder_dtype": _shards.dtype_name(self.dtype),
        }

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [B, 77 + t5_len, D], pooled [B, 2048])`` as ``StableDiffusion3Pipeline.encode_prompt``."""
        embeds, pooled = [], []
        for tok, enc in ((self.tok_l, self.clip_l), (self.tok_g, self.clip_g)):
            ids = tok(captions, padding="max_length", max_length=self.clip_len, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            pooled.append(out[0])
            embeds.append(out.hidden_states[-2])
        clip = torch.cat(embeds, dim=-1)
        ids = self.tok_t5(captions, padding="max_length", max_length=self.t5_len, truncation=True,
                          add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
        t5 = self.t5(ids)[0]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, seeds: list[int] | None) -> torch.Tensor:
        """Latents of ``pixels`` ``[B, 3, H, W]`` in [-1, 1]; ``seeds`` per image for a draw, None for the mean."""
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        z = dist.mean
        if seeds is not None:
            noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
            z = z + dist.std * noise.to(z.device, z.dtype)
        return (z - self.shift_factor) * self.scaling_factor


# ----------------------------------------------------------------------------------------------------------
# the run


@dataclass
class PreprocessConfig:
    input: str
    output: str
    encoders: EncoderPaths
    resolution: int | None = 256
    buckets: str | None = None
    bucket_step: int = 64
    t5_len: int = 256
    dtype: str = "bfloat16"
    encoder_dtype: str | None = None  # default: float32 on CPU, bfloat16 on GPU
    shard_size: int = 256
    batch_size: int = 16
    latent_sampling: str = "sample"
    seed: int = 0
    mask_suffix: str | None = None
    device: str | None = None
    merge_timeout: float = 86400.0
    quiet: bool = False
    caption_key: str = "caption"  # tar input: the caption's key in KEY.json (without KEY.txt)
    extra: dict = field(default_factory=dict)


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM env, else (0, 1, 0)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _log(cfg, rank, msg):
    if not cfg.quiet:
        print(f"[preprocess rank {rank}] {msg}", file=sys.stderr, flush=True)


def _unit_done(out: Path, u: int) -> dict | None:
    rec_p = out / "units" / f"u{u:06d}.json"
    if not rec_p.exists():
        return None
    try:
        rec = json.loads(rec_p.read_text())
    except (OSError, ValueError):
        return None
    for s in rec["shards"]:
        p = out / s["file"]
        if not p.exists() or p.stat().st_size != s["bytes"]:
            return None
    return rec


def _fingerprint(cfg: PreprocessConfig, items: list[InputItem], buckets) -> dict:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.image, it.caption, it.mask]).encode())
    return {"inputs_sha256": h.hexdigest(), "num_inputs": len(items), "buckets": [list(b) for b in buckets],
            "encoders": asdict(cfg.encoders), "t5_len": cfg.t5_len, "dtype": cfg.dtype,
            "shard_size": cfg.shard_size, "latent_sampling": cfg.latent_sampling, "seed": cfg.seed}


TAR_STRIDE = 1 << 24
"""Tar input: sample ``pos`` of tar ``u`` is input ``u * TAR_STRIDE + pos`` (its latent seed's key)."""


def _fingerprint_tars(cfg: PreprocessConfig, tars: list[str], buckets) -> dict:
    h = hashlib.sha256()
    for t in tars:
        h.update(json.dumps([t, os.path.getsize(t)]).encode())
    return {"inputs_sha256": h.hexdigest(), "num_tars": len(tars), "caption_key": cfg.caption_key,
            "buckets": [list(b) for b in buckets], "encoders": asdict(cfg.encoders), "t5_len": cfg.t5_len,
            "dtype": cfg.dtype, "latent_sampling": cfg.latent_sampling, "seed": cfg.seed}


def skipped_summary(skipped: list[dict]) -> str:
    """``3 skipped (1 no caption, 1 empty tar, 1 unreadable image)``: the skipped inputs by reason."""
    kinds: dict[str, int] = {}
    for e in skipped:
        kind = str(e.get("reason", "")).split(":")[0].split(" (")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    detail = ", ".join(f"{n} {k}" for k, n in kinds.items())
    return f"{len(skipped)} skipped" + (f" ({detail})" if detail else "")


def process_unit(u: int, unit_items: list[tuple[int, InputItem]], enc: Encoders, buckets, cfg, out: Path,
                 skipped_inputs: list[dict] | None = None) -> dict:
    from PIL import Image

    out_dtype = _shards.dtype_from_name(cfg.dtype)
    skipped, groups = list(skipped_inputs or []), {}
    for idx, it in unit_items:
        try:
            img = load_image(it.image, it.data)
            b = choose_bucket(img.width, img.height, buckets)
            H, W = buckets[b]
            px = image_to_tensor(resize_crop(img, H, W, Image.Resampling.LANCZOS))
            mask = None
            if it.mask is not None:
                mask = mask_to_latent(it.mask, H, W, (H // enc.vae_scale_factor, W // enc.vae_scale_factor))
        except Exception as e:
            why = f"unreadable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"[:300]
            entry = {"path": it.image, "reason": why}
            if it.data is not None:  # a tar's sample: TAR#KEY
                entry["tar"], entry["key"] = it.image.rsplit("#", 1)
            skipped.append(entry)
            continue
        groups.setdefault(b, []).append((idx, it, px, mask))
    shard_entries = []
    for b in sorted(groups):
        rows = groups[b]
        lat, emb, pool = [], [], []
        for i in range(0, len(rows), cfg.batch_size):
            chunk = rows[i:i + cfg.batch_size]
            seeds = None if cfg.latent_sampling == "mean" else [_seed_for(cfg.seed, idx) for idx, *_ in chunk]
            lat.append(enc.encode_images(torch.stack([r[2] for r in chunk]), seeds).to("cpu", out_dtype))
            e, p = enc.encode_prompts([r[1].caption for r in chunk])
            emb.append(e.to("cpu", out_dtype))
            pool.append(p.to("cpu", out_dtype))
        tensors = {"latents": torch.cat(lat), "prompt_embeds": torch.cat(emb), "pooled_prompt_embeds": torch.cat(pool)}
        if any(r[3] is not None for r in rows):
            h, w = tensors["latents"].shape[-2:]
            tensors["mask"] = torch.stack([r[3] if r[3] is not None else torch.ones(h, w) for r in rows]).to(out_dtype)
        meta = {"sources": json.dumps([r[1].image for r in rows]), "captions": json.dumps([r[1].caption for r in rows]),
                "input_indices": json.dumps([r[0] for r in rows])}
        entry = _shards.write_shard(out / "shards" / f"u{u:06d}-b{b:02d}.safetensors", tensors, meta)
        entry["bucket"] = b
        shard_entries.append(entry)
    rec = {"unit": u, "shards": shard_entries, "skipped": skipped, "num_inputs": len(unit_items)}
    _shards.atomic_write_json(out / "units" / f"u{u:06d}.json", rec)
    return rec


def _seed_for(seed: int, idx: int) -> int:
    from megatron_sd3.data._seeding import derive_seed

    return derive_seed(seed, idx, "latent")


def merge_manifest(out: Path, num_units: int, base: dict, listing_skipped: list[dict], timeout: float,
                   log=lambda m: None) -> dict:
    """Wait for every unit record, then write ``manifest.json`` (rank 0)."""
    t0, last = time.time(), 0.0
    while True:
        missing = [u for u in range(num_units) if _unit_done(out, u) is None]
        if not missing:
            break
        if time.time() - t0 > timeout:
            raise TimeoutError(f"units {missing[:10]}{'...' if len(missing) > 10 else ''} not finished after {timeout:.0f}s")
        if time.time() - last > 30:
            log(f"waiting for {len(missing)} unit(s) from other ranks")
            last = time.time()
        time.sleep(0.2)
    shards_, skipped = [], list(listing_skipped)
    for u in range(num_units):
        rec = _unit_done(out, u)
        shards_ += rec["shards"]
        skipped += rec["skipped"]
    m = dict(base)
    m.update({"format": _shards.FORMAT, "version": _shards.VERSION, "shards": shards_,
              "num_samples": sum(s["num_samples"] for s in shards_), "skipped": skipped, "num_skipped": len(skipped)})
    _shards.atomic_write_json(out / _shards.MANIFEST, m)
    return m


def run(cfg: PreprocessConfig, rank: int | None = None, world_size: int | None = None) -> dict | None:
    """Do this rank's units; on rank 0 also merge the manifest. Returns the manifest on rank 0, else None."""
    r, w, local = dist_env()
    rank = r if rank is None else rank
    world_size = w if world_size is None else world_size
    if cfg.latent_sampling not in ("sample", "mean"):
        raise ValueError(f"latent_sampling must be 'sample' or 'mean', got {cfg.latent_sampling!r}")
    _shards.dtype_from_name(cfg.dtype)  # validates before any work
    buckets = parse_buckets(cfg.resolution, cfg.buckets, cfg.bucket_step)
    cfg.encoders.check()  # fail before any work
    from megatron_sd3.data.tar_input import expand_tars, is_tar_input, read_tar

    tars = expand_tars(cfg.input) if is_tar_input(cfg.input) else None  # a unit per tar
    if tars is None:
        items, listing_skipped = list_inputs(cfg.input, cfg.mask_suffix)
    else:
        items, listing_skipped = [], []
    out = Path(cfg.output)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "units").mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(cfg, items, buckets) if tars is None else _fingerprint_tars(cfg, tars, buckets)
    fp_path = out / "preprocess_config.json"
    if fp_path.exists():
        old = json.loads(fp_path.read_text())
        if old != json.loads(json.dumps(fp)):
            diff = sorted(k for k in fp if old.get(k) != json.loads(json.dumps(fp))[k])
            raise InputError(f"output {out}: holds a run with other settings ({', '.join(diff)}); use a new folder")
    else:
        _shards.atomic_write_json(fp_path, fp)

    n_units = len(tars) if tars is not None else (math.ceil(len(items) / cfg.shard_size) if items else 0)
    mine = [u for u in range(n_units) if u % world_size == rank]
    todo = [u for u in mine if _unit_done(out, u) is None]
    if cfg.device:
        device = torch.device(cfg.device)
    else:
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    enc_dtype = _shards.dtype_from_name(cfg.encoder_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    what = f"{len(tars)} tars" if tars is not None else f"{len(items)} inputs, {n_units} units"
    _log(cfg, rank, f"{what}; this rank: {len(mine)} units, {len(mine) - len(todo)} already done; device {device}")
    if not todo and rank != 0:
        return None  # nothing to encode, and the manifest is rank 0's job
    enc = Encoders(cfg.encoders, device, enc_dtype, cfg.t5_len)
    if enc.latent_channels <= 0 or any(h % enc.vae_scale_factor or w % enc.vae_scale_factor for h, w in buckets):
        raise ValueError(f"buckets {buckets} are not divisible by the VAE scale factor {enc.vae_scale_factor}")
    t0, done_imgs = time.time(), 0
    bar = _Progress(cfg, rank, len(todo))
    for k, u in enumerate(todo):
        tu = time.time()
        if tars is None:
            lo = u * cfg.shard_size
            unit_items, read_skipped = list(enumerate(items[lo:lo + cfg.shard_size], start=lo)), []
        else:
            tar_items, read_skipped = read_tar(tars[u], cfg.caption_key)
            unit_items = list(enumerate(tar_items, start=u * TAR_STRIDE))
        rec = process_unit(u, unit_items, enc, buckets, cfg, out, read_skipped)
        done_imgs += len(unit_items)
        el = time.time() - t0
        rate = done_imgs / el if el > 0 else float("nan")
        name = f"tar {tars[u]}" if tars is not None else f"unit {u}"
        bar.update(k + 1, done_imgs, rate, f"{name} ({k + 1}/{len(todo)}): {len(unit_items)} samples, "
                                           f"{len(rec['skipped'])} skipped, {time.time() - tu:.1f}s")
    bar.close()
    if rank != 0:
        return None
    base = {
        "dtype": cfg.dtype, "buckets": [list(b) for b in buckets],
        "latent_buckets": [[h // enc.vae_scale_factor, w // enc.vae_scale_factor] for h, w in buckets],
        "latent_channels": enc.latent_channels, "text_len": enc.text_len, "text_dim": enc.text_dim,
        "pooled_dim": enc.pooled_dim, "encoders": enc.info(),
        "preprocess": {"input": str(cfg.input), "resolution": cfg.resolution, "buckets": cfg.buckets,
                       "shard_size": cfg.shard_size, "latent_sampling": cfg.latent_sampling, "seed": cfg.seed,
                       "world_size": world_size},
    }
    m = merge_manifest(out, n_units, base, listing_skipped, cfg.merge_timeout, lambda s: _log(cfg, rank, s))
    _log(cfg, rank, f"manifest: {m['num_samples']} samples in {len(m['shards'])} shards, "
                    f"{skipped_summary(m['skipped'])}")
    return m


class _Progress:
    """A progress bar with samples/s on a terminal (stderr), else one log line per unit."""

    def __init__(self, cfg, rank: int, total: int):
        self.cfg, self.rank, self.total = cfg, rank, total
        self.tty = not cfg.quiet and sys.stderr.isatty()

    def update(self, done: int, samples: int, rate: float, line: str):
        if not self.tty:
            _log(self.cfg, self.rank, f"{line} | {samples} samples, {rate:.2f} samples/s")
            return
        width = 30
        fill = int(width * done / max(self.total, 1))
        sys.stderr.write(f"\r[preprocess rank {self.rank}] [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
                         f"units | {samples} samples | {rate:.2f} samples/s ")
        sys.stderr.flush()

    def close(self):
        if self.tty and self.total:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------------------------------------
# sample prompts

SAMPLE_PROMPTS_FILE = "sample_prompts.safetensors"


def read_prompt_list(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file (one a line) or a ``.jsonl`` with a ``prompt``/``caption``/``text`` field."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--prompts {p}: file not found")
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix.lower() == ".jsonl":
            try:
                row = json.loads(line)
            except ValueError:
                raise InputError(f"--prompts {p}: line {n} is not JSON") from None
            text = next((row[k] for k in ("prompt", "caption", "text") if isinstance(row, dict) and row.get(k)), None)
            if text is None:
                raise InputError(f"--prompts {p}: line {n} has no prompt/caption/text field")
            prompts.append(str(text).strip())
        else:
            prompts.append(line.strip())
    if not prompts:
        raise InputError(f"--prompts {p}: no prompts in the file")
    return prompts


def write_prompt_embeds(prompts: list[str], encoders: "Encoders", path: str | os.PathLike,
                        dtype: str = "float32", batch_size: int = 16) -> Path:
    """Encode ``prompts`` (as the dataset's captions are encoded) into one safetensors file."""
    from safetensors.torch import save_file

    out_dtype = _shards.dtype_from_name(dtype)
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        e, p = encoders.encode_prompts(prompts[i:i + batch_size])
        embeds.append(e.to("cpu", out_dtype))
        pooled.append(p.to("cpu", out_dtype))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeds": torch.cat(embeds).contiguous(), "pooled_prompt_embeds": torch.cat(pooled).contiguous()},
              str(path), metadata={"prompts": json.dumps(prompts)})
    return path
