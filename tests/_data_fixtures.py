"""Tiny random-initialised SD3 encoders, tokenizers and images on disk, for the data tests and the bench.

The layout is diffusers' SD3 folder (``vae/``, ``text_encoder{,_2,_3}/``, ``tokenizer{,_2,_3}/``).
Dimensions kept from the real models where they are part of the data contract: 16 latent channels,
VAE scale factor 8 (4 blocks), CLIP projection dims 768 / 1280 (pooled 2048), T5 width 4096, CLIP length
77. Everything else is tiny (hidden 32, 1-2 layers, a 60-token vocabulary) and random.
"""

from __future__ import annotations

import string
from pathlib import Path

WORDS = ["a", "the", "cat", "dog", "on", "mat", "red", "blue", "tree", "sky", "in", "of", "house", "small"]


def build_tiny_sd3_encoders(root: str | Path, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
    from transformers import T5TokenizerFast

    root = Path(root)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64,
        shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False,
    )
    vae.save_pretrained(root / "vae")

    letters = string.ascii_lowercase
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in letters + ".,":
        vocab[c] = len(vocab)
    for c in letters + ".,":
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("o", "n</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for sub, proj in (("", 768), ("_2", 1280)):
        cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=77, projection_dim=proj,
                             bos_token_id=0, eos_token_id=1, pad_token_id=1)
        CLIPTextModelWithProjection(cfg).save_pretrained(root / f"text_encoder{sub}")
        tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>" if not sub else "!")
        tok.model_max_length = 77
        tok.save_pretrained(root / f"tokenizer{sub}")

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + c, -1.0) for c in letters] \
        + [(c, -2.0) for c in letters] + [("\u2581", -1.5)] + [("\u2581" + w, -0.5) for w in WORDS if len(w) > 1]
    t5tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    t5tok.model_max_length = 512
    t5tok.save_pretrained(root / "tokenizer_3")
    t5cfg = T5Config(vocab_size=len(pieces), d_model=4096, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(t5cfg).save_pretrained(root / "text_encoder_3")
    return root


def make_image_folder(root: str | Path, n: int = 12, corrupt: tuple[int, ...] = (5,), seed: int = 0,
                      sizes=((64, 64), (96, 56), (56, 96)), masks: bool = False) -> Path:
    """``n`` generated images (PNG/JPEG, several aspect ratios) with .txt captions; ``corrupt`` ones are garbage."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        ext = ".png" if i % 2 == 0 else ".jpg"
        p = root / f"img{i:03d}{ext}"
        if i in corrupt:
            p.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image" if ext == ".png" else b"\xff\xd8\xff garbage")
        else:
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i * 20) % 256, ((xx + yy) * 2) % 256], -1)
            noise = rng.integers(0, 40, size=(h, w, 3))
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(p)
            if masks and i % 4 == 0:
                m = np.zeros((h, w), np.uint8)
                m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
                Image.fromarray(m).save(root / f"img{i:03d}_mask.png")
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(3 + i % 5)]
        (root / f"img{i:03d}.txt").write_text(" ".join(words) + ".\n")
    return root


def make_tar_shards(root: str | Path, seed: int = 0) -> tuple[Path, dict]:
    """webdataset tars as img2dataset writes them: ``00000.tar`` .. ``00005.tar`` of
    ``KEY.png|jpg|webp`` with ``KEY.txt`` and/or ``KEY.json``. Returns ``(folder, expected)``:
    ``expected["good"]`` the ``TAR#KEY`` of every good sample; ``expected["skipped"]`` ``{TAR#KEY or
    TAR: reason word}`` of the bad ones: a truncated image, a sample without a caption, an empty tar,
    a truncated tar (its first sample is intact and kept, the one at the cut is not)."""
    import io
    import json as _json
    import tarfile

    import numpy as np
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def image(fmt, w, h):
        a = rng.integers(0, 255, size=(h, w, 3)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, fmt)
        return buf.getvalue()

    def write(name, samples):
        path = root / name
        with tarfile.open(path, "w") as t:
            for key, files in samples:
                for ext, data in files:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
        return str(path)

    good, skipped = [], {}
    sizes = [(64, 64), (96, 56), (56, 96)]

    def caption(k):
        return f"a picture number {k} of {WORDS[k % len(WORDS)]}".encode()

    k = 0
    for t in range(6):
        name = f"{t:05d}.tar"
        samples = []
        if t == 2:  # an empty tar
            write(name, [])
            skipped[str(root / name)] = "empty tar"
            continue
        for j in range(3):
            key = f"{t:05d}{j:04d}"
            w, h = sizes[k % 3]
            fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][k % 3]
            files = [(ext, image(fmt, w, h))]
            if k % 2 == 0:
                files.append(("txt", caption(k)))
            else:  # img2dataset's json, caption only there
                files.append(("json", _json.dumps({"caption": caption(k).decode(), "key": key}).encode()))
            where = f"{root / name}#{key}"
            if t == 1 and j == 0:  # a truncated image
                files[0] = (ext, files[0][1][: len(files[0][1]) // 3])
                skipped[where] = "unreadable image"
            elif t == 1 and j == 1:  # no caption
                files = files[:1]
                skipped[where] = "no caption"
            else:
                good.append(where)
            samples.append((key, files))
            k += 1
        path = write(name, samples)
        if t == 4:  # a truncated tar: cut in the middle of its second sample's image
            data = open(path, "rb").read()
            with tarfile.open(path) as tf:
                second = tf.getmembers()[2]
            cut = second.offset_data + second.size // 2 + 7
            open(path, "wb").write(data[:cut])
            for key in (f"{t:05d}0001", f"{t:05d}0002"):
                good.remove(f"{path}#{key}")
            skipped[f"{path}#{t:05d}0001"] = "truncated tar"
    return root, {"good": good, "skipped": skipped}


def train_pp2_on(data_dir, tmp_path, iters: int, extra=()) -> list[dict]:
    """``pretrain_sd3.py --data-path DATA`` on 2 ranks, PP=2, with the tiny blocks at the widths of
    data made by the tiny encoders (77 CLIP + 16 T5 tokens x 4096, pooled 2048); its metrics rows."""
    import json

    from _ranks import run_ranks

    cfg = Path(tmp_path) / "data.toml"
    cfg.write_text("[model]\npreset = 'tiny'\njoint_attention_dim = 4096\npooled_projection_dim = 2048\n"
                   "text_seq_len = 93\ntext_recon_gamma = 0.5\ntext_recon_target_layer = 1\nzero_init_adaln = false\n")
    metrics = Path(tmp_path) / "m.jsonl"
    run_ranks("pretrain_sd3.py", 2, ["--config", str(cfg), "--data-path", str(data_dir),
                                     "--pipeline-model-parallel-size", "2", "--micro-batch-size", "1",
                                     "--global-batch-size", "2", "--train-iters", str(iters), "--log-interval", "1",
                                     "--metrics-file", str(metrics), "--no-progress", *extra], timeout=240)
    return [json.loads(line) for line in metrics.read_text().splitlines()]
