"""Train several adaptation recipes side by side, each a variant of one base config, then score
their checkpoints with benchmarks/bench_adaptation.py.

    python scripts/adaptation_sweep.py --base configs/shipped/adapt.yaml --out runs/sweep \\
        --variant "w1=diffusion.ar_loss_weight=1" --variant "w0=diffusion.ar_loss_weight=0" \\
        --set train.save_interval=61 --set train.keep_last_k=30 --jobs 4

Each variant is the base config with dotted-key overrides (`section.key=YAML value`, `;` between
several); its run directory is `<out>/<name>`. Runs are independent processes (at most
`--jobs` at a time), checkpointed by the trainer: running the same command again resumes every
unfinished run and skips finished ones. Logs go to `<out>/<name>.log`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def apply_overrides(cfg: dict, overrides: str) -> dict:
    for item in filter(None, (o.strip() for o in overrides.split(";"))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} is not section.key=value")
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return cfg


def variant_config(base: Path, name: str, overrides: str, common: list[str], out: Path) -> Path:
    cfg = yaml.safe_load(base.read_text())
    for o in common:
        apply_overrides(cfg, o)
    apply_overrides(cfg, overrides)
    cfg["output_dir"] = str(out / name)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def prepare_data(config: Path) -> None:
    """Tokenize the data once (data.cache_dir, data.num_workers) before the runs start, so the
    runs read the cache instead of each rendering the same files."""
    from fastdllm.training.base_model import initial_model
    from fastdllm.training.config_file import load_train_config
    from fastdllm.training.dataset import build_datasets

    cfg = load_train_config(config)
    if cfg.data.cache_dir is None:
        return
    t0 = time.perf_counter()
    model, tokenizer, _ = initial_model(cfg)
    train, val = build_datasets(cfg, tokenizer, model.config.mask_token_id)
    print(f"data: {len(train)} train rows, {len(val) if val else 0} val rows, cached in "
          f"{cfg.data.cache_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", action="append", required=True, help="NAME=section.key=value;...")
    ap.add_argument("--set", action="append", default=[], help="override applied to every variant")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pending = []
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        config = variant_config(args.base, name, overrides, args.set, args.out)
        if (args.out / name / "final" / "model.safetensors").is_file():
            print(f"{name}: finished already", flush=True)
            continue
        pending.append((name, config))
    if pending:
        prepare_data(pending[0][1])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    running: dict[str, subprocess.Popen] = {}
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            name, config = pending.pop(0)
            cmd = [sys.executable, "-m", "fastdllm.training", "--config", str(config)]
            if (args.out / name / "checkpoints").is_dir() and any((args.out / name / "checkpoints").iterdir()):
                cmd.append("--resume")
            log = open(args.out / f"{name}.log", "a")
            running[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"{name}: started ({' '.join(cmd[3:])})", flush=True)
        time.sleep(2)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                print(f"{name}: exit {proc.returncode}", flush=True)
                if proc.returncode:
                    failed.append(name)
    if failed:
        raise SystemExit(f"failed runs: {', '.join(failed)} (see their logs under {args.out})")


if __name__ == "__main__":
    main()
