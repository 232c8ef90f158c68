"""Byte-level helpers for the checkpoint-corruption tests (where a tensor's data starts; flip one byte)."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from remedi.model import checkpoint as C
from remedi.model.config import get_config
from remedi.model.loading import load_for_inference, preflight
from remedi.model.llada import RemeDiLM, UPSHead, init_weights


def data_offset(path, key=None):
    """Byte offset of the first tensor's data (safetensors) or of ``data/0`` in a torch.save archive."""
    path = str(path)
    if path.endswith(".safetensors"):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        return 8 + n
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    with open(path, "rb") as f:  # the local header's own name/extra lengths (they may differ from the directory's)
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
    return info.header_offset + 30 + name_len + extra_len


def flip_byte(path, offset):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x5A
    open(path, "wb").write(bytes(data))
