"""Training images/s with and without ``data.cache: memory``, measured on this machine.

    python benchmarks/data_speed.py [--steps 30] [--warmup 5] [--repeats 1] [--json out/data_speed.json]

Runs ``train.py`` in a subprocess for the dense recipe (configs/cifar10_dense.yaml) and for its
pruning fine-tune (configs/cifar10_dynvit.yaml from ``--dense``, by default the shared dense
CIFAR-10 checkpoint), each with ``data.cache: none`` and ``memory``, in turn (repeats
interleaved, so that a change in machine load hits both). A run trains ``warmup + steps``
optimizer steps and stops; images/s is the global batch times ``steps`` over the time
between the end of step ``warmup`` and the end of the last step, read from the run's
``metrics.jsonl`` (so decoding, model building and the first steps are left out). The memory
runs share a decoded-split cache (``--cache-dir``): the first decodes, the others load.

Every run also records the share of the CPUs other processes took while it ran
(:class:`dynvit.benchmark.OtherCpuUse`; the finished ``train.py`` and its data-loader
workers count as this script's own), and the 1-minute load average before it started.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dynvit import benchmark as bench  # noqa: E402

RECIPES = {
    "dense": ("configs/cifar10_dense.yaml", []),
    "dynvit fine-tune": ("configs/cifar10_dynvit.yaml", ["--model.pretrained_path", "{dense}"]),
}
CACHES = ("none", "memory")


def run_once(config: str, extra: list[str], cache: str, args, out: Path) -> dict:
    """One ``train.py`` run; its images/s over the timed steps and the machine's load meanwhile."""
    cmd = [sys.executable, "train.py", "--config", config, *extra, "--data.cache", cache,
           "--train.output_dir", str(out), "--train.stop_after_steps", str(args.warmup + args.steps),
           "--train.log_every", "1", "--train.trackers", "[]", "--train.progress_bar", "false",
           "--train.flops_images", "0", "--data.cache_dir", str(args.cache_dir), *args.train_args]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with bench.OtherCpuUse() as other:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"train.py failed ({' '.join(map(shlex.quote, cmd))}):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in records if "train/total" in r}
    batch = int(yaml.safe_load((out / "config.yaml").read_text())["data"]["batch_size"])  # global, per step
    seconds = times[args.warmup + args.steps] - times[args.warmup]
    return {"images_per_s": batch * args.steps / seconds, "timed_seconds": seconds, "wall_seconds": round(wall, 1),
            "other_cpu_share": other.share, "steal_share": other.steal, "load_average_before": round(load, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps before the timing starts")
    p.add_argument("--repeats", type=int, default=1, help="runs per recipe and cache (median reported)")
    p.add_argument("--dense", default=str(REPO.parent / "shared" / "checkpoints" / "cifar10_vit_dense"),
                   help="dense checkpoint the fine-tune starts from")
    p.add_argument("--cache-dir", help="decoded-split cache of the memory runs (default: a temporary folder)")
    p.add_argument("--json", default="out/data_speed.json")
    args, rest = p.parse_known_args(argv)
    args.train_args = [a for a in rest if a != "--"]  # extra train.py overrides, e.g. -- --data.num_workers 4
    with tempfile.TemporaryDirectory(prefix="data_speed_") as tmp:
        args.cache_dir = args.cache_dir or os.path.join(tmp, "decoded")
        runs: dict[str, dict[str, list[dict]]] = {name: {c: [] for c in CACHES} for name in RECIPES}
        for r in range(args.repeats):
            for name, (config, extra) in RECIPES.items():
                for cache in CACHES:
                    extra_args = [a.format(dense=args.dense) for a in extra]
                    out = Path(tmp) / f"{name.split()[0]}_{cache}_{r}"
                    result = run_once(config, extra_args, cache, args, out)
                    runs[name][cache].append(result)
                    print(f"{name}, cache {cache}: {result['images_per_s']:.0f} images/s, other processes "
                          f"{100 * (result['other_cpu_share'] or 0):.0f}% of the CPUs", file=sys.stderr, flush=True)
    command = "python benchmarks/data_speed.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    machine = bench.machine_info()
    header = ["recipe", "images/s, cache none", "images/s, cache memory", "memory / none",
              "CPU taken by others (none / memory runs)"]
    lines = []
    for name, by_cache in runs.items():
        ips = {c: statistics.median(r["images_per_s"] for r in by_cache[c]) for c in CACHES}
        other = {c: max(r["other_cpu_share"] or 0.0 for r in by_cache[c]) for c in CACHES}
        lines.append([name, f"{ips['none']:.0f}", f"{ips['memory']:.0f}", f"{ips['memory'] / ips['none']:.2f}x",
                      f"{100 * other['none']:.0f}% / {100 * other['memory']:.0f}%"])
    print(f"<!-- {command} -->\n{machine['processor']}, {os.cpu_count()} CPUs, torch {machine['torch']}; "
          f"{args.steps} timed steps after {args.warmup}, median of {args.repeats} run(s)\n")
    print(bench.markdown_table(header, lines))
    bench.write_json(args.json, {"command": command, "machine": machine, "steps": args.steps, "warmup": args.warmup,
                                 "runs": runs})


if __name__ == "__main__":
    main()
