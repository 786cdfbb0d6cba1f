"""What every timing command of ``python -m dynvit.benchmark`` shares: its options, the thread
count, the machine and its load, the command that reproduces the run, the JSON it writes.

A timing on a shared machine is only as good as the load it ran under, so every command prints
the 1-minute load average at its start and end and the share of the CPUs other processes took
while timing (:class:`~dynvit.benchmark.speed.OtherCpuUse`), and writes them into its JSON.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex

import torch

from .report import write_json
from .speed import machine_info

__all__ = ["add_timing_options", "Run"]

PROG = "python -m dynvit.benchmark"


def add_timing_options(parser: argparse.ArgumentParser, *, json: str, repeats: int = 5, min_seconds: float = 1.0) -> None:
    """The options every timing command takes."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds; the median (of ratios: paired) is reported")
    parser.add_argument("--min-seconds", type=float, default=min_seconds, help="minimum length of one timed repeat")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, usually the core count)")
    parser.add_argument("--max-load", type=float,
                        help="refuse to start when the 1-minute load average is above this (default: time anyway, and say so)")
    parser.add_argument("--json", default=json, help="where every figure goes")


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


class Run:
    """One benchmark run: threads and logging set, the load checked and recorded, the command that
    reproduces it.

    Args:
        subcommand: the ``python -m dynvit.benchmark`` subcommand.
        args: its parsed options (those of :func:`add_timing_options` among them).
        argv: the arguments it was given (for the reproducing command).
        command: the reproducing command, when it is not ``python -m dynvit.benchmark`` (a script).
    """

    def __init__(self, subcommand: str, args: argparse.Namespace, argv: list[str], command: str | None = None):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("dynvit.benchmark").setLevel(logging.ERROR)  # "untrained predictors" is expected here
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        self.args, self.subcommand = args, subcommand
        self.command = command or f"{PROG} {subcommand} " + " ".join(shlex.quote(a) for a in argv)
        self.load_start = _load()
        limit = getattr(args, "max_load", None)
        if limit is not None and self.load_start is not None and self.load_start > limit:
            raise SystemExit(f"load average {self.load_start:.2f} > --max-load {limit}: other work would distort the "
                             "timings; wait for a quiet machine or raise --max-load (and do not publish the result)")
        self.machine = machine_info()

    def load_line(self, other_share: float | None = None) -> str:
        """The machine and its load: where the figures came from and how far to trust them."""
        m = self.machine
        other = "" if other_share is None else f"; CPU taken by other processes while timing: up to {100 * other_share:.0f}%"
        return (f"{m['processor']}, {torch.get_num_threads()} threads, torch {m['torch']}, timm {m['timm']}; 1-minute load "
                f"average {self.load_start} at the start, {_load()} at the end{other}")

    def progress_logger(self) -> logging.Logger:
        """The logger the run reports its progress on, ``dynvit.benchmark.<subcommand>`` (stderr,
        at INFO: shown although the rest of ``dynvit.benchmark`` logs errors only during a run)."""
        logger = logging.getLogger(f"dynvit.benchmark.{self.subcommand}")
        logger.setLevel(logging.INFO)
        return logger

    def report(self, *texts: str) -> None:
        """The run's output (tables and notes) on stdout: a command line's, not the library's."""
        for text in texts:
            print(text, flush=True)

    def write(self, payload: dict) -> str:
        """The JSON of the run: ``payload`` with the command, the machine and the load."""
        path = write_json(self.args.json, {"command": self.command, "machine": self.machine,
                                           "load_average_start": self.load_start, "load_average_end": _load(), **payload})
        self.report(f"\n(every figure: {path})")
        return path
