"""webdataset / img2dataset tar shards as preprocessing input (``tools/preprocess_data.py --input
'SHARDS/{00000..09999}.tar'``).

* ``expand_tars(pattern)``: brace patterns (``braceexpand``, as webdataset's own URLs) and globs over
  local paths, in order, each tar once; a pattern that names a missing tar is one error.
* ``read_tar(path, caption_key)``: the samples of one tar, read with the ``webdataset`` package
  (``tarfile_to_samples``: files grouped by key). A sample is ``KEY.jpg|jpeg|png|webp`` with its
  caption in ``KEY.txt``, else in the ``caption_key`` field of ``KEY.json`` (img2dataset writes both).
  Returns ``(items, skipped)``: ``items`` as ``InputItem`` with the image's bytes, in tar order;
  ``skipped`` names by tar and key each sample without an image or a caption, an empty tar, and a
  truncated tar (a read error, or a size that is not whole 512-byte tar blocks): the samples read
  whole before the cut are kept (tarfile never hands out a short member), the one at the cut is
  named by the last member header before it and skipped, with whatever followed it.
"""
from __future__ import annotations

import glob
import json
import os

from megatron_sd3.data.inputs import InputError, InputItem

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def is_tar_input(source: str | os.PathLike) -> bool:
    return str(source).lower().endswith(".tar")


def expand_tars(pattern: str) -> list[str]:
    """Local tar paths of a brace pattern and/or glob, in order, without repeats."""
    try:
        import webdataset  # noqa: F401  (read_tar needs it: say so before any work)
        from braceexpand import braceexpand
    except ImportError:
        raise InputError(f"input {pattern}: tar input needs webdataset: pip install webdataset braceexpand") from None

    out: list[str] = []
    for p in braceexpand(str(pattern)):
        out += sorted(glob.glob(p)) if glob.has_magic(p) else [p]
    out = list(dict.fromkeys(out))
    if not out:
        raise InputError(f"input {pattern}: matches no tar file")
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise InputError(f"input {pattern}: {len(missing)} of {len(out)} tars do not exist (first: {missing[0]}); "
                         f"fix the pattern (brace ranges and globs are expanded)")
    return out


def _caption(sample: dict, caption_key: str) -> str | None:
    if sample.get("txt") is not None:
        text = sample["txt"].decode("utf-8", errors="replace").strip()
        if text:
            return text
    if sample.get("json") is not None:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return None
        text = meta.get(caption_key) if isinstance(meta, dict) else None
        if isinstance(text, str) and text.strip():
            return text.strip()
    return None


def read_tar(path: str, caption_key: str = "caption"):
    """``(items, skipped)`` of one tar (see the module docstring)."""
    import webdataset as wds

    errors: list[Exception] = []

    def keep_going(exn: Exception) -> bool:  # webdataset's handler: note the error, end this tar
        errors.append(exn)
        return True

    samples = list(wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples(handler=keep_going)))
    size = os.path.getsize(path)
    truncated = bool(size) and (errors or size % 512 != 0)
    skipped: list[dict] = []
    if not samples:
        why = "empty tar" if not size or not truncated else f"truncated tar: no sample read ({_first(errors)})"
        return [], [{"tar": path, "key": None, "path": path, "reason": why}]
    if truncated:
        key = _key_at_cut(path)
        if key is not None and key == samples[-1]["__key__"]:
            samples.pop()  # its files up to the cut were read; the ones after it are lost
        skipped.append({"tar": path, "key": key, "path": f"{path}#{key}" if key else path,
                        "reason": f"truncated tar: the sample at the cut and any after it "
                                  f"({_first(errors) or 'size not whole tar blocks'}); the {len(samples)} "
                                  f"before it are kept"})
    items = []
    for s in samples:
        key = s["__key__"]
        ext = next((e for e in IMAGE_EXTS if s.get(e) is not None), None)
        caption = _caption(s, caption_key)
        where = f"{path}#{key}"
        if ext is None:
            skipped.append({"tar": path, "key": key, "path": where, "reason": "no image (jpg, jpeg, png, webp)"})
        elif caption is None:
            skipped.append({"tar": path, "key": key, "path": where,
                            "reason": f"no caption (.txt, or the '{caption_key}' key of .json)"})
        else:
            items.append(InputItem(image=where, caption=caption, data=s[ext]))
    return items, skipped


def _key_at_cut(path: str) -> str | None:
    """The key (webdataset's: the name up to its first dot) of the last member header a truncated
    tar still holds: the member the cut falls in."""
    import tarfile

    last = None
    try:
        with tarfile.open(path, "r|") as tf:
            for info in tf:
                last = info.name
    except (tarfile.TarError, EOFError, OSError):
        pass
    if last is None:
        return None
    head, _, name = last.rpartition("/")
    return (head + "/" if head else "") + name.split(".", 1)[0]


def _first(errors: list[Exception]) -> str:
    if not errors:
        return ""
    e = errors[0]
    text = str(e.args[0]) if e.args else ""
    return f"{type(e).__name__}: {text.split(' @ ')[0]}"[:200]  # webdataset appends " @ <file object>"
