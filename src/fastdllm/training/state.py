"""Training checkpoints: engine-loadable model directories that also hold the trainer's state.

Layout: `run_dir/checkpoints/step-000500/` holds a normal checkpoint (config.json with bd_size
and mask_token_id, model.safetensors, tokenizer files, generation_config.json) plus, under
`trainer_state/`, `tensors.safetensors` (optimizer moments, RNG states) and `state.json` (step,
data position, counters, optimizer hyper-parameters, python RNG state, the run's config).
Nothing is pickled, so loading a checkpoint never executes code.

Atomicity: everything is written into a hidden staging directory (`fastdllm.atomic.atomic_dir`),
which is renamed to `step-XXXXXX` only when complete; `trainer_state/state.json` is the last
file written. Only directories with that name *and* that file count as checkpoints, so a crash
at any point leaves at worst a `.step-XXXXXX.tmp-*` directory that is ignored (and removed by
the next run).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir
from ..errors import FastDLLMError
from ..model.checkpoint import write_checkpoint_files

# in a subdirectory, so the model loader's *.safetensors glob never mistakes them for weights
STATE_DIR = "trainer_state"
STATE_JSON = f"{STATE_DIR}/state.json"
STATE_TENSORS = f"{STATE_DIR}/tensors.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
# what atomic_dir leaves beside step-XXXXXX if the process dies mid-save (staging / replaced copy)
STALE_PATTERNS = (".step-*.tmp-*", ".step-*.old-*")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / STATE_JSON).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def remove_stale(root: Path) -> None:
    """Delete staging directories left by a run that died while saving."""
    if root.is_dir():
        for pattern in STALE_PATTERNS:
            for path in root.glob(pattern):
                shutil.rmtree(path, ignore_errors=True)


# ---- optimizer state <-> (tensors, json) ----

def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ---- RNG states (one snapshot per process) ----

def rng_snapshot() -> dict[str, Any]:
    """This process's RNG states as JSON-able lists (gathered across processes, then saved)."""
    version, mt, gauss = random.getstate()
    snap: dict[str, Any] = {"python": [version, list(mt), gauss],
                            "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        snap["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np
    except ImportError:
        return snap
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    snap["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return snap


def restore_rng(snap: dict[str, Any]) -> None:
    version, mt, gauss = snap["python"]
    random.setstate((version, tuple(mt), gauss))
    torch.set_rng_state(torch.tensor(snap["torch"], dtype=torch.uint8))
    if "cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in snap["cuda"]])
    if "numpy" in snap:
        import numpy as np

        kind, keys, pos, has_gauss, cached = snap["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _rng_to_flat(snaps: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Byte-string states go to safetensors; the python state stays JSON."""
    tensors, rest = {}, []
    for rank, snap in enumerate(snaps):
        tensors[f"rng.{rank}.torch"] = torch.tensor(snap["torch"], dtype=torch.uint8)
        for i, s in enumerate(snap.get("cuda", [])):
            tensors[f"rng.{rank}.cuda.{i}"] = torch.tensor(s, dtype=torch.uint8)
        if "numpy" in snap:
            tensors[f"rng.{rank}.numpy"] = torch.tensor(snap["numpy"][1], dtype=torch.int64)
        numpy_rest = [snap["numpy"][0], *snap["numpy"][2:]] if "numpy" in snap else None
        rest.append({"python": snap["python"], "numpy": numpy_rest,
                     "cuda_devices": len(snap.get("cuda", []))})
    return tensors, rest


def rng_for_rank(tensors: dict[str, torch.Tensor], rest: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    info = rest[rank]
    snap: dict[str, Any] = {"python": info["python"], "torch": tensors[f"rng.{rank}.torch"].tolist()}
    if info["cuda_devices"]:
        snap["cuda"] = [tensors[f"rng.{rank}.cuda.{i}"].tolist() for i in range(info["cuda_devices"])]
    if info["numpy"] is not None:
        kind, pos, has_gauss, cached = info["numpy"]
        snap["numpy"] = [kind, tensors[f"rng.{rank}.numpy"].tolist(), pos, has_gauss, cached]
    return snap


# ---- writing and reading a checkpoint ----

def write_checkpoint(root: Path, step: int, *, model, tokenizer, generation_config: dict,
                     official_layout: bool, optimizer_state: dict, rng_snapshots: list[dict],
                     trainer_state: dict[str, Any], keep_last_k: int) -> Path:
    """Write `root/step-XXXXXX` atomically and prune to the newest `keep_last_k`."""
    final = root / checkpoint_name(step)
    # replaces a directory of the same step left by an earlier, interrupted attempt
    with atomic_dir(final) as staging:
        write_checkpoint_files(staging, model, tokenizer=tokenizer, generation_config=generation_config,
                               official_layout=official_layout)
        (staging / STATE_DIR).mkdir()
        opt_tensors, opt_meta = optimizer_to_flat(optimizer_state)
        rng_tensors, rng_rest = _rng_to_flat(rng_snapshots)
        save_file({**opt_tensors, **rng_tensors}, str(staging / STATE_TENSORS))
        state = {**trainer_state, "optimizer": opt_meta, "rng": rng_rest}
        (staging / STATE_JSON).write_text(json.dumps(state, indent=1) + "\n")
    for _, old in complete_checkpoints(root)[:-keep_last_k]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    state = json.loads((path / STATE_JSON).read_text())
    return state, load_file(str(path / STATE_TENSORS))


# ---- resuming ----

def config_diff(saved: dict, given: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(saved) | set(given)):
        a, b = saved.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_same_run(state: dict[str, Any], config: dict[str, Any], world_size: int, path: Path) -> None:
    """A checkpoint resumes only the run that wrote it: same config, same process count."""
    if state["config"] != config:
        diffs = config_diff(state["config"], config)
        raise FastDLLMError(f"{path} was written with a different config; resume needs the same "
                            f"file. Differences (saved -> given): {'; '.join(diffs[:5])}")
    if state["world_size"] != world_size:
        raise FastDLLMError(f"{path} was written by {state['world_size']} processes, this run has "
                            f"{world_size}: the global batch would change; resume with the same count")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records an interrupted run wrote after the checkpoint it resumes from."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in lines))
