"""What preprocessing reads, as both of its readers hand it on: a folder or list of images
(``preprocess.list_inputs``) and webdataset tars (``tar_input.read_tar``)."""
from __future__ import annotations

from dataclasses import dataclass


class InputError(ValueError):
    """The input folder / list / tars cannot be read (one-line message)."""


@dataclass
class InputItem:
    image: str  # a path, or TAR#KEY for a sample of a tar (data: its bytes)
    caption: str
    mask: str | None = None
    data: bytes | None = None
