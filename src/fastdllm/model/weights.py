"""Checking a checkpoint's files before anything is allocated from them.

A checkpoint directory may come from anyone. Before the model is built, every file it will read
is confined to the checkpoint directory (or, for a hub download, its repository in the hub
cache), so an index entry `../../x` or a symlink to `/etc/passwd` is refused; the parameter
bytes implied by config.json are compared with the memory the device has; and every
safetensors header is parsed and each tensor's dtype, shape and byte range checked against the
file and the model the config describes. Only then are tensors read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FastDLLMError

# safetensors dtype name -> bytes per element; weights are floating point
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_OTHER_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                 "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def confinement_roots(model_dir: Path) -> list[Path]:
    """Where a checkpoint's files may live: its directory, and for a hub snapshot the
    repository's folder in the hub cache (snapshots are symlinks into `../../blobs`)."""
    root = model_dir.resolve()
    roots = [root]
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        hub = Path(HF_HUB_CACHE).resolve()
        if root.is_relative_to(hub) and root != hub:
            roots.append(hub / root.relative_to(hub).parts[0])
    except ImportError:
        pass
    return roots


def confined(path: Path, model_dir: Path, what: str) -> Path:
    """`path` itself, after checking that it (and any symlink on the way) resolves inside the
    checkpoint's roots."""
    target = path.resolve()
    roots = confinement_roots(model_dir)
    if not any(target.is_relative_to(r) for r in roots):
        shown = path.relative_to(model_dir) if path.is_relative_to(model_dir) else path
        raise FastDLLMError(f"{model_dir}: {what} '{shown}' resolves to {target}, outside the "
                            "checkpoint directory; a checkpoint's files must live inside it")
    return path


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, after checking that the header is valid JSON
    and every tensor's bytes lie inside the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _broken(file, f"it has {size} bytes, too few for a safetensors header")
        n = struct.unpack("<Q", head)[0]
        if not 2 <= n <= min(_MAX_HEADER, size - 8):
            raise _broken(file, f"its header claims {n:,} bytes but the file has {size:,}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise _broken(file, f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _broken(file, "its header is not a JSON object")
    data_bytes = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _broken(file, f"tensor {name!r} has no dtype/shape/offsets entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in FLOAT_DTYPES and dtype not in _OTHER_DTYPES:
            raise _broken(file, f"tensor {name!r} has an unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _broken(file, f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise _broken(file, f"tensor {name!r} has invalid data offsets {offsets!r}")
        itemsize = FLOAT_DTYPES.get(dtype) or _OTHER_DTYPES[dtype]
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise _broken(file, f"tensor {name!r} of shape {tuple(shape)} and dtype {dtype} needs "
                                f"{math.prod(shape) * itemsize:,} bytes but its offsets span "
                                f"{offsets[1] - offsets[0]:,}")
        if offsets[1] > data_bytes:
            raise _broken(file, f"tensor {name!r} ends at byte {offsets[1]:,} of the data but the "
                                f"file holds {data_bytes:,}: the file is truncated; re-download it")
        out[name] = TensorInfo(file, dtype, tuple(shape))
    return out


def check_tensors(files: list[Path], expected: dict[str, tuple[int, ...]], *,
                  skip: set[str]) -> dict[str, TensorInfo]:
    """Parse every file's header and check each tensor against `expected` (name -> shape);
    names in `skip` may be present and are ignored. Returns name -> where it is."""
    found: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in skip or name.endswith("rotary_emb.inv_freq"):
                continue
            if name not in expected:
                raise FastDLLMError(f"{file.name}: unexpected tensor {name!r} for this config")
            if name in found:
                raise FastDLLMError(f"tensor {name!r} is in both {found[name].file.name} and {file.name}")
            if info.dtype not in FLOAT_DTYPES:
                raise FastDLLMError(f"{file.name}: tensor {name!r} has dtype {info.dtype}; weights "
                                    f"must be floating point ({', '.join(FLOAT_DTYPES)})")
            if info.shape != tuple(expected[name]):
                raise FastDLLMError(f"{file.name}: tensor {name!r} has shape {info.shape}, "
                                    f"config.json implies {tuple(expected[name])}")
            found[name] = info
    missing = sorted(set(expected) - set(found))
    if missing:
        raise FastDLLMError(f"weights missing from the safetensors files: {missing[:5]}")
    return found


def check_fits(n_params: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, with the numbers, a model whose weights cannot fit the device's free memory."""
    need = n_params * torch.finfo(dtype).bits // 8
    free = free_bytes(device)
    if free is not None and need > free:
        raise FastDLLMError(f"config.json describes {n_params:,} parameters: {need / 2**30:,.1f} GiB "
                            f"in {str(dtype).replace('torch.', '')}, but {device} has "
                            f"{free / 2**30:,.1f} GiB free; use a smaller model or dtype, or "
                            "another device", field="model")


def check_finite(name: str, tensor: torch.Tensor, file: Path) -> None:
    """One reduction per tensor: a NaN or an infinity anywhere makes the sum non-finite."""
    if not torch.isfinite(tensor.sum(dtype=torch.float32)):
        raise FastDLLMError(f"{file.name}: tensor {name!r} holds NaN or infinite values; the "
                            "checkpoint is corrupt (re-download it, or take an earlier training "
                            "checkpoint)")


def free_bytes(device: torch.device) -> int | None:
    """Memory free on `device` now (None where it cannot be told): what loading checks the
    weights against and what a KV-cache budget given as a fraction is a fraction of."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _broken(file: Path, why: str) -> FastDLLMError:
    return FastDLLMError(f"{file.name} is not a valid safetensors file: {why}; re-download or "
                         "re-save the checkpoint")
