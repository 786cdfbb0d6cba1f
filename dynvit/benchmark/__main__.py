"""``python -m dynvit.benchmark <command> ...``: every timing of dynvit from one command line.

    python -m dynvit.benchmark speed --preset demo         # dense vs pruned: eager, compiled, ONNX Runtime
    python -m dynvit.benchmark speed --preset deit_small
    python -m dynvit.benchmark methods                     # DeiT-S: dynvit, EViT, ToMe, random, the ceiling
    python -m dynvit.benchmark threshold-batch             # packing or regrouping threshold-mode batches (a trained model)
    python -m dynvit.benchmark train-step                  # a fine-tune step against a dense step
    python -m dynvit.benchmark data                        # train.py images/s with and without data.cache memory
    python -m dynvit.benchmark gpu [--quick]               # everything on one GPU in one call (dynvit.benchmark.gpu)

``python -m dynvit.benchmark <command> --help`` lists a command's options. Every command prints
the machine's load with its figures and writes them all to ``--json``. Arguments after ``--``
(``speed``: ``--model.key value`` config overrides; ``data``: ``train.py`` overrides) are passed on.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "speed": ("dynvit.benchmark.deploy", "dense vs pruned, eager / compiled / ONNX Runtime, batch 1 and 64"),
    "methods": ("dynvit.benchmark.methods", "token-reduction methods side by side on DeiT-S, with the ceiling"),
    "threshold-batch": ("dynvit.benchmark.threshold_batch", "threshold-mode batches: packed, regrouped or padded"),
    "train-step": ("dynvit.benchmark.train_step", "a pruning fine-tune step against a dense step"),
    "data": ("dynvit.benchmark.data_speed", "train.py images/s with data.cache none and memory"),
    "gpu": ("dynvit.benchmark.gpu", "the whole GPU benchmark in one call (--quick: a small CPU run)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return ("usage: python -m dynvit.benchmark <command> [options] [-- passed-on arguments]\n\ncommands:\n"
            + "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    own, extra = (rest[: rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    importlib.import_module(COMMANDS[command][0]).main(own, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
