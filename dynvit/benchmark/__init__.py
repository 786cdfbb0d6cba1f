"""Measure token-reduction methods side by side: accuracy, GMACs, kept tokens, parameters, speed.

- :mod:`.accuracy`: :func:`evaluate` (and :func:`evaluate_modes`, several pruning modes in one
  pass) gives top-1, top-5, the mean patch tokens each block computes and the kept tokens of
  every image per stage; :func:`kept_token_stats` their mean and 5th/95th percentiles;
  :func:`spread_indices` a sample spread over a class-ordered set (for GMACs and timing).
- :mod:`.speed`: :func:`measure_speed` gives images/s, repeats interleaved across models,
  median reported; :func:`paired_speedup` the speed-up of one model over another from the
  ratios within each round of repeats; :class:`OtherCpuUse` what other processes took meanwhile.
- :mod:`.compare`: :func:`make_method` builds ``dense``, ``dynvit``, ``evit``, ``tome`` or
  ``random`` on a copy of one dense model, :func:`compare` measures them all alike,
  :func:`match_tome_r` picks ToMe's ``r`` whose GMACs is closest to a target.
- :mod:`.runtimes`: :func:`deployment_speed` times models eager, compiled and in ONNX Runtime
  in one interleaved run, each speed-up paired with dense in the same runtime.
- :mod:`.report`: :func:`markdown_table`, :func:`results_table` and :func:`write_json`.

The command line, ``python -m dynvit.benchmark <command>`` (:mod:`.__main__`), runs every timing
of the project: ``speed`` (:mod:`.deploy`), ``methods``, ``threshold-batch``, ``train-step``,
``data`` (:mod:`.data_speed`) and ``gpu`` (:mod:`.gpu`, also ``python -m dynvit.benchmark.gpu``),
with the set-up they share in :mod:`.cli`.
"""
from .accuracy import Accuracy, evaluate, evaluate_modes, kept_token_stats, spread_indices
from .compare import METHODS, compare, default_prune_loc, dense_backbone, make_method, match_tome_r
from .report import markdown_table, results_table, write_json
from .runtimes import deployment_speed
from .speed import OtherCpuUse, machine_info, measure_speed, paired_speedup

__all__ = [
    "METHODS", "dense_backbone", "default_prune_loc", "make_method", "evaluate",
    "evaluate_modes", "Accuracy", "kept_token_stats", "spread_indices", "match_tome_r", "measure_speed", "paired_speedup",
    "OtherCpuUse", "machine_info",
    "compare", "markdown_table", "results_table", "write_json", "deployment_speed",
]
