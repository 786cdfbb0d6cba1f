"""Timing: images/s of eval-mode models, repeats interleaved across models, and what else
used the CPU meanwhile.

:func:`measure_speed` is the one timer of dynvit (``eval.py``, ``scripts/demo.py`` and the
benchmarks use it), :func:`paired_speedup` the one way its results become speed-ups;
:class:`OtherCpuUse` says whether a timing can be trusted.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import timm
import torch
from torch import nn

from ..export import tile_images
from ..progress import progress

__all__ = ["measure_speed", "paired_speedup", "OtherCpuUse", "machine_info"]

_log = logging.getLogger(__name__)


def machine_info(device: str | torch.device = "cpu") -> dict:
    """What the timings ran on: device, processor, threads, library versions, load average."""
    device = torch.device(device)
    info = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "timm": timm.__version__, "python": platform.python_version(), "processor": _cpu_name()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class OtherCpuUse:
    """Context manager: the share of the CPUs that *other* processes (and the hypervisor's
    steal) took while the block ran, from ``/proc/stat`` minus our own CPU time.

    Our own time is, by default, this process's and that of its child processes that ended
    and were waited for inside the block (a ``subprocess.run``, data-loader workers that were
    shut down); ``own`` replaces it, e.g. by the CPU time of a running process tree. Without
    a ``with`` block, :meth:`start` and :meth:`stop` mark the interval.

    A timing is trustworthy when ``share`` is near 0; ``None`` where ``/proc/stat`` is missing.

    Args:
        own: CPU seconds (a running total) that count as ours.
    """

    share: float | None = None
    steal: float | None = None
    own_seconds: float | None = None  # our own CPU time in the interval

    def __init__(self, own: Callable[[], float] | None = None):
        self._own = own or self._this_process

    @staticmethod
    def _read() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [float(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        steal = fields[7] if len(fields) > 7 else 0.0
        return (sum(fields[:8]) - idle - steal) / hz, steal / hz

    @staticmethod
    def _this_process() -> float:
        # process_time() reads the kernel's nanosecond CPU clock; os.times() counts in clock
        # ticks (10 ms), too coarse for a short block. Children are only counted in ticks.
        t = os.times()
        return time.process_time() + t.children_user + t.children_system

    def start(self) -> OtherCpuUse:
        self._start = (self._read(), self._own(), time.perf_counter())
        return self

    def stop(self) -> None:
        end, own, wall = self._read(), self._own(), time.perf_counter()
        self.own_seconds = own - self._start[1]
        if self._start[0] is None or end is None:
            return
        capacity = (wall - self._start[2]) * (os.cpu_count() or 1)
        others = (end[0] - self._start[0][0]) - self.own_seconds
        # /proc/stat counts in clock ticks, so a short interval can read a little over 1
        self.share = min(1.0, max(0.0, others) / capacity)
        self.steal = (end[1] - self._start[0][1]) / capacity

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(
    models: dict[str, nn.Module],
    images: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 64),
    *,
    repeats: int = 5,
    warmup: int = 3,
    min_seconds: float = 1.0,
) -> dict:
    """Images per second of each eval-mode model at each batch size.

    The calls go round consecutive batches of ``images`` (``images`` repeated when there are
    fewer than ``bs``), so that in threshold mode, where the cost depends on the image, the
    figure is a mean over many images rather than the cost of the first ones.

    Per batch size: each model is warmed up (``warmup`` calls, discarded) and given enough
    calls per repeat to run ``min_seconds``; then the repeats go round the models in turn, so
    a change in machine load hits every model alike. The median of the repeats is reported.

    Returns:
        ``{name: {batch_size: {"images_per_s", "repeats", "calls_per_repeat", "other_cpu_share",
        "steal_share"}}}``; the last two (see :class:`OtherCpuUse`) say how much other work ran
        during the repeats of that batch size, and should be near 0 for figures to publish.
    """
    device = images.device
    result: dict[str, dict[int, dict]] = {name: {} for name in models}
    bar = progress(desc="timing", total=len(batch_sizes) * repeats * len(models), unit="run")
    for bs in batch_sizes:
        batches = [tile_images(images, bs)] if len(images) < 2 * bs else list(images[: len(images) // bs * bs].split(bs))
        batch = batches[0]
        calls = {}
        for name, model in models.items():
            model.eval()
            for _ in range(warmup):
                model(batch)
            _sync(device)
            t0 = time.perf_counter()
            model(batch)
            _sync(device)
            calls[name] = max(1, math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-6)))
        rates: dict[str, list[float]] = {name: [] for name in models}
        with OtherCpuUse() as other:
            for _ in range(repeats):
                for name, model in models.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    for c in range(calls[name]):
                        model(batches[c % len(batches)])
                    _sync(device)
                    rates[name].append(calls[name] * bs / (time.perf_counter() - t0))
                    bar.set_postfix_str(f"batch {bs}, {name}", refresh=False)
                    bar.update()  # after the clock stopped
        if other.share is not None and other.share + other.steal > 0.05:
            _log.warning("batch %d: other processes took %.0f%% of the CPUs (steal %.0f%%) while timing; "
                         "do not publish these figures", bs, 100 * other.share, 100 * other.steal)
        for name in models:
            result[name][bs] = {"images_per_s": statistics.median(rates[name]), "repeats": rates[name],
                                "calls_per_repeat": calls[name], "other_cpu_share": other.share,
                                "steal_share": other.steal}
            _log.info("%s batch %d: %.1f images/s", name, bs, result[name][bs]["images_per_s"])
    bar.close()
    return result


def paired_speedup(rates: Sequence[float], base_rates: Sequence[float]) -> float:
    """Speed-up of a model over a base model timed in the same :func:`measure_speed` call, from
    their ``"repeats"`` (images/s per round of repeats): the median over the rounds of the ratio
    of the two rates within a round.

    A round lasts a few seconds. When the machine's speed drifts over a run (on a virtual machine
    other tenants share the memory bandwidth, which ``/proc/stat`` does not show), the drift
    cancels in each round's ratio, whereas the ratio of the two medians keeps whatever separates
    the rounds each median came from.
    """
    if len(rates) != len(base_rates) or not rates:
        raise ValueError(f"need the same number of repeats of both models, got {len(rates)} and {len(base_rates)}")
    return statistics.median(r / b for r, b in zip(rates, base_rates))
