"""The timing entry point (``python -m dynvit.benchmark``) and the one-call GPU benchmark, run
small on the CPU so they cannot rot. Timings themselves are never checked (the machine is
shared); what is checked is that every row is produced, errors stay in their row, and the
output files are written."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import dynvit
from dynvit.benchmark import __main__ as cli
from dynvit.benchmark import gpu
from dynvit.benchmark.compare import dense_backbone, make_method
from dynvit.benchmark.deploy import speed_table
from dynvit.benchmark.runtimes import deployment_speed


def test_command_line_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("speed", "methods", "threshold-batch", "train-step", "data", "gpu"):
        assert command in out
    assert cli.main(["no-such-command"]) == 2


def test_gpu_quick_run_writes_every_row_and_keeps_failures_in_their_row(tmp_path, monkeypatch, one_thread):

    def failing_evit(dense, method, **kw):
        if method == "evit":
            raise RuntimeError("evit broke")
        return make_method(dense, method, **kw)

    monkeypatch.setattr(gpu, "make_method", failing_evit)
    result = gpu.main(["--quick", "--backend", "eager", "--models", "quick_a", "--batch", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["inference"] == json.loads(json.dumps(result["inference"]))
    rows = {(r["method"], r["runtime"]) for r in saved["inference"] if "images_per_s" in r}
    assert rows == {(m, r) for m in ("dense", "topk", "threshold", "tome") for r in ("eager", "compiled")}
    assert all(r["speedup"] > 0 for r in saved["inference"])
    assert [e["what"] for e in saved["errors"]] == ["quick_a evit: build"]
    assert "RuntimeError: evit broke" in saved["errors"][0]["error"]
    kinds = {r["kind"]: r for r in saved["training"]}
    assert set(kinds) == {"dense", "fine-tune, masked", "fine-tune, dropping"}
    assert kinds["dense"]["ratio_to_dense"] == 1.0
    markdown = (tmp_path / "gpu.md").read_text()
    assert "| quick_a | threshold | compiled | 2 |" in markdown and "fine-tune, dropping" in markdown


def test_gpu_run_out_of_budget_skips_rows_but_writes_files(tmp_path):
    result = gpu.main(["--quick", "--models", "quick_a", "--budget-s", "0", "--out", str(tmp_path)])
    assert result["inference"] == [] and len(result["skipped"]) == 2 * 2 * 5 + 1  # 2 batches x 2 runtimes x 5, training
    assert json.loads((tmp_path / "gpu.json").read_text())["skipped"] == result["skipped"]
    assert "skipped (time budget)" in (tmp_path / "gpu.md").read_text()


def test_deployment_speed_pairs_every_runtime_with_its_dense_model(one_thread):
    dense = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2,
                              num_classes=5).eval()
    pruned = dynvit.patch(dense_backbone(dense), prune_loc=(1, 2), keep_ratio=0.6, prune_mode="topk").eval()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = deployment_speed({"dense": dense, "top-k": pruned}, images, (1, 4), runtimes=("eager", "onnxruntime"),
                              repeats=2, min_seconds=0.01)
    for runtime in ("eager", "onnxruntime"):
        assert [result["speed"]["dense"][runtime][bs]["speedup"] for bs in (1, 4)] == [1.0, 1.0]
        assert all(result["speed"]["top-k"][runtime][bs]["images_per_s"] > 0 for bs in (1, 4))
    assert result["onnx"]["top-k"]["max_abs_diff"] < 1e-4
    table = speed_table(result, {"dense": 1.0, "top-k": 0.5})
    assert "| top-k | 4 | 0.5 | 2.00x |" in table and "ONNX Runtime speed-up" in table


def test_deployment_speed_rejects_unknown_runtimes():
    with pytest.raises(ValueError, match="runtimes must be among"):
        deployment_speed({"dense": torch.nn.Identity()}, torch.zeros(1, 3, 4, 4), runtimes=("tensorrt",))
