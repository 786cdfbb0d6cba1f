"""``python -m dynvit.benchmark data``: training images/s with and without ``data.cache: memory``
(docs/BENCHMARKS.md, section 4).

    python -m dynvit.benchmark data [--steps 30] [--warmup 5] [--repeats 1] [--json out/data_speed.json]

Runs ``train.py`` in a subprocess for the dense recipe (configs/cifar10_dense.yaml) and for its
pruning fine-tune (configs/cifar10_dynvit.yaml from ``--dense``, by default the shared dense
CIFAR-10 checkpoint), each with ``data.cache: none`` and ``memory``, in turn (repeats
interleaved, so that a change in machine load hits both). A run trains ``warmup + steps``
optimizer steps and stops; images/s is the global batch times ``steps`` over the time
between the end of step ``warmup`` and the end of the last step, read from the run's
``metrics.jsonl`` (so decoding, model building and the first steps are left out). The memory
runs share a decoded-split cache (``--cache-dir``): the first decodes, the others load.

Over the timed steps, each run also records the CPU time ``train.py`` and its data-loader
workers spent per image (less sensitive to other load than images/s) and the share of the
CPUs other processes took (:class:`dynvit.benchmark.OtherCpuUse`); the table reports the
largest share seen. ``-- --data.num_workers 4`` passes overrides on to every run. Needs the
repository (``train.py`` and ``configs/``), not only the installed package.
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

from .cli import Run
from .deploy import REPO
from .report import markdown_table
from .speed import OtherCpuUse

RECIPES = {
    "dense": ("configs/cifar10_dense.yaml", []),
    "dynvit fine-tune": ("configs/cifar10_dynvit.yaml", ["--model.pretrained_path", "{dense}"]),
}
CACHES = ("none", "memory")


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a running process and its descendants (live ones, and those
    that ended and were waited for: data-loader workers, for instance)."""
    hz = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float]] = {}  # pid -> (parent, own + waited-for children's CPU seconds)
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
        except (OSError, IndexError):
            continue
        procs[int(entry)] = (int(fields[1]), sum(int(v) for v in fields[11:15]) / hz)  # utime stime cutime cstime
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += procs.get(p, (0, 0.0))[1]
        todo += [child for child, (parent, _) in procs.items() if parent == p]
    return total


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else -1
    except (OSError, ValueError, KeyError):  # not there yet, or a line being written
        return -1


def run_once(config: str, extra: list[str], cache: str, args, out: Path) -> dict:
    """One ``train.py`` run: images/s over the timed steps, the CPU time the run (its workers
    included) spent per image meanwhile, and the share of the CPUs other processes took."""
    cmd = [sys.executable, "train.py", "--config", config, *extra, "--data.cache", cache,
           "--train.output_dir", str(out), "--train.stop_after_steps", str(args.warmup + args.steps),
           "--train.log_every", "1", "--train.trackers", "[]", "--train.progress_bar", "false",
           "--train.flops_images", "0", "--data.cache_dir", str(args.cache_dir), *args.train_args]
    load = os.getloadavg()[0]
    out.mkdir(parents=True)
    with open(out / "stderr.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        window, state = OtherCpuUse(own=lambda: tree_cpu(proc.pid)), "waiting"
        while proc.poll() is None:  # the timed steps, marked by their lines in metrics.jsonl
            step = _last_step(out / "metrics.jsonl")
            if state == "waiting" and step >= args.warmup:
                window.start()
                state = "timing"
            if state == "timing" and step >= args.warmup + args.steps:
                window.stop()
                state = "done"
            time.sleep(0.05)
    if proc.returncode or state != "done":
        raise SystemExit(f"train.py failed ({' '.join(map(shlex.quote, cmd))}):\n{(out / 'stderr.txt').read_text()[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in records if "train/total" in r}
    batch = int(yaml.safe_load((out / "config.yaml").read_text())["data"]["batch_size"])  # global, per step
    seconds, images = times[args.warmup + args.steps] - times[args.warmup], batch * args.steps
    return {"images_per_s": images / seconds, "timed_seconds": seconds,
            "cpu_ms_per_image": 1000 * window.own_seconds / images, "other_cpu_share": window.share,
            "steal_share": window.steal, "load_average_before": round(load, 2)}


def main(argv: list[str], extra: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m dynvit.benchmark data", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps before the timing starts")
    p.add_argument("--repeats", type=int, default=1, help="runs per recipe and cache (median reported)")
    p.add_argument("--dense", default=str(REPO.parent / "shared" / "checkpoints" / "cifar10_vit_dense"),
                   help="dense checkpoint the fine-tune starts from")
    p.add_argument("--cache-dir", help="decoded-split cache of the memory runs (default: a temporary folder)")
    p.add_argument("--json", default="out/data_speed.json")
    args = p.parse_args(argv)
    args.train_args = list(extra or [])  # train.py overrides, e.g. -- --data.num_workers 4
    if not (REPO / "train.py").is_file():
        raise SystemExit(f"the data benchmark runs train.py of the repository, not found at {REPO / 'train.py'}")
    run = Run("data", args, argv + (["--", *extra] if extra else []))
    log = run.progress_logger()
    with tempfile.TemporaryDirectory(prefix="data_speed_") as tmp:
        args.cache_dir = args.cache_dir or os.path.join(tmp, "decoded")
        runs: dict[str, dict[str, list[dict]]] = {name: {c: [] for c in CACHES} for name in RECIPES}
        for r in range(args.repeats):
            for name, (config, extra_args) in RECIPES.items():
                for cache in CACHES:
                    out = Path(tmp) / f"{name.split()[0]}_{cache}_{r}"
                    result = run_once(config, [a.format(dense=args.dense) for a in extra_args], cache, args, out)
                    runs[name][cache].append(result)
                    log.info("%s, cache %s: %.0f images/s, %.1f CPU-ms per image, other processes %.0f%% of the CPUs",
                             name, cache, result["images_per_s"], result["cpu_ms_per_image"],
                             100 * (result["other_cpu_share"] or 0))
    header = ["recipe", "images/s, cache none", "images/s, cache memory", "memory / none",
              "CPU-ms per image, none / memory", "CPU taken by others, none / memory runs"]
    lines, worst = [], 0.0
    for name, by_cache in runs.items():
        med = {c: {k: statistics.median(r[k] for r in by_cache[c]) for k in ("images_per_s", "cpu_ms_per_image")}
               for c in CACHES}
        other = {c: max(r["other_cpu_share"] or 0.0 for r in by_cache[c]) for c in CACHES}
        worst = max(worst, *other.values())
        ips = {c: med[c]["images_per_s"] for c in CACHES}
        lines.append([name, f"{ips['none']:.0f}", f"{ips['memory']:.0f}", f"{ips['memory'] / ips['none']:.2f}x",
                      f"{med['none']['cpu_ms_per_image']:.1f} / {med['memory']['cpu_ms_per_image']:.1f}",
                      f"{100 * other['none']:.0f}% / {100 * other['memory']:.0f}%"])
    run.report(f"<!-- {run.command} -->\n{os.cpu_count()} CPUs; {args.steps} timed steps after {args.warmup}, median of "
               f"{args.repeats} run(s)\n{run.load_line(worst)}\n", markdown_table(header, lines))
    run.write({"steps": args.steps, "warmup": args.warmup, "runs": runs})
    return runs
