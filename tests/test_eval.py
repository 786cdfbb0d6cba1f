"""eval.py and dynvit.benchmark on a tiny model: figures that must agree with each other.

GMACs fall with the keep ratio, every baseline at keep ratio 1.0 (ToMe r=0) is the dense
model, the dense row is the unpatched model, and the JSON holds what the table shows.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import time

import pytest
import timm
import torch

import dynvit
from dynvit import benchmark as bench
from dynvit.hub import load_pretrained, save_pretrained
from dynvit.visualize import masked_panels

from conftest import REPO, cifar_dir, randomize_

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=10)
TINY_YAML = "{img_size: 32, patch_size: 8, embed_dim: 48, depth: 4, num_heads: 2, mlp_ratio: 2.0, num_classes: 10}"
DATA_CFG = dict(input_size=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), crop_pct=1.0,
                interpolation="bicubic")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _eval_module():
    spec = importlib.util.spec_from_file_location("dynvit_eval_cli", REPO / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_dense(seed: int = 0) -> torch.nn.Module:
    model = randomize_(timm.create_model("vit_tiny_patch16_224", **TINY), seed).eval()
    model.dynvit_meta = {"model_name": "vit_tiny_patch16_224", "timm_kwargs": dict(TINY)}
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A dense checkpoint and a dynvit one fine-tuned from it (here: perturbed, not trained)."""
    root = tmp_path_factory.mktemp("ckpt")
    dense = _tiny_dense()
    save_pretrained(dense, root / "dense", classes=CLASSES, data_config=DATA_CFG)
    model = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1, 2), keep_ratio=0.7, **TINY)
    model.load_state_dict({**dense.state_dict(), **{k: v for k, v in model.state_dict().items() if k not in dense.state_dict()}})
    randomize_(model.predictors, seed=3, scale=0.5)  # predictors that tell tokens apart
    save_pretrained(model, root / "dynvit", classes=CLASSES, data_config=DATA_CFG)
    return root


def test_flops_only_sweep_is_monotone_and_starts_dense(tmp_path):
    out = tmp_path / "flops.json"
    _eval_module().main(["--model", "vit_tiny_patch16_224", "--model-kwargs", TINY_YAML, "--prune-loc", "1,2",
                         "--flops-only", "--sweep", "1.0,0.7,0.4", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(result))  # plain JSON
    by_method: dict[str, list[float]] = {}
    for entry in result["sweep"]:
        rows = {r["method"]: r for r in entry["rows"]}
        assert set(rows) == set(bench.METHODS)
        for name, row in rows.items():
            by_method.setdefault(name, []).append(row["gmacs"])
            assert row["gmacs_ratio"] == pytest.approx(row["gmacs"] / rows["dense"]["gmacs"])
        if entry["keep_ratio"] == 1.0:
            for name in ("evit", "tome", "random"):
                assert rows[name]["gmacs"] == pytest.approx(rows["dense"]["gmacs"], rel=1e-12)
            assert rows["tome"]["tome_r"] == 0
            assert rows["dynvit"]["gmacs"] > rows["dense"]["gmacs"]  # the predictors cost something
    for name, gmacs in by_method.items():
        assert all(b <= a for a, b in zip(gmacs, gmacs[1:])), (name, gmacs)
    assert by_method["dynvit"][-1] < 0.7 * by_method["dense"][0]


def test_baselines_at_full_keep_equal_dense():
    dense = _tiny_dense()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(x)
        for method, kwargs in [("evit", {}), ("random", {}), ("tome", {"tome_r": 0}), ("dense", {})]:
            model = bench.make_method(dense, method, prune_loc=(1, 2), keep_ratio=1.0, **kwargs)
            torch.testing.assert_close(model(x), ref, rtol=0, atol=0, msg=method)
        dyn = bench.make_method(dense, "dynvit", prune_loc=(1, 2), keep_ratio=1.0, prune_mode="topk")
        torch.testing.assert_close(dyn(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bench.dense_backbone(dyn)(x), ref, rtol=0, atol=0)
    assert not dynvit.is_patched(bench.dense_backbone(dyn))


def test_make_method_builds_the_recipe_it_is_given():
    dense = _tiny_dense()
    recipe = dict(predictor_hidden_ratio=0.25, predictor_prior="match", dropped_tokens="merge")
    model = bench.make_method(dense, "dynvit", prune_loc=(1, 2), keep_ratio=0.6, prune_mode="topk", **recipe)
    config = model.dynvit_config()
    assert {k: config[k] for k in recipe} == recipe
    assert all(p.prior == "match" and p.local_dim == 6 for p in model.predictors)  # a quarter of 48, halved
    plain = bench.make_method(dense, "dynvit", prune_loc=(1, 2), keep_ratio=0.6, prune_mode="topk")
    assert plain.dynvit_config()["dropped_tokens"] == "discard" and plain.predictors[0].local_dim == 24
    assert not dynvit.is_patched(dense)  # a copy is patched, never the model passed in


def test_match_tome_r_is_closest():
    dense = _tiny_dense()
    target = 0.6 * dynvit.count_flops(dense, (3, 32, 32))
    r, gmacs = bench.match_tome_r(dense, target, (3, 32, 32))
    near = [dynvit.count_flops(bench.make_method(dense, "tome", tome_r=v), (3, 32, 32)) for v in (r - 1, r + 1) if v >= 0]
    assert all(abs(gmacs - target) <= abs(g - target) for g in near)


def test_calibrated_threshold_keeps_the_target():
    dense = _tiny_dense()
    model = bench.make_method(dense, "dynvit", prune_loc=(1, 2), keep_ratio=(0.6, 0.3), prune_mode="threshold")
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    dynvit.calibrate(model, images)  # untrained predictors: only the thresholds place the budget
    with torch.no_grad():
        masks = model.forward_pruned(images).keep_masks
    kept = [float(m.float().mean()) for m in masks]
    assert kept == pytest.approx([0.6, 0.3], abs=0.01)


def _spin(cpu_seconds: float) -> None:
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        sum(i * i for i in range(1000))


def test_measure_speed_reports_medians():
    models = {"dense": _tiny_dense(), "tome": bench.make_method(_tiny_dense(), "tome", tome_r=2)}
    speed = bench.measure_speed(models, torch.randn(2, 3, 32, 32), (1, 4), repeats=3, warmup=1, min_seconds=0.01)
    for name in models:
        for bs in (1, 4):
            s = speed[name][bs]
            assert len(s["repeats"]) == 3 and s["calls_per_repeat"] >= 1
            assert min(s["repeats"]) <= s["images_per_s"] <= max(s["repeats"])
            assert s["other_cpu_share"] is None or 0.0 <= s["other_cpu_share"] <= 1.0
    info = bench.machine_info()
    assert info["threads"] == torch.get_num_threads() and info["device"] == "cpu"
    with bench.OtherCpuUse() as ours:
        _spin(0.05)
    assert ours.own_seconds >= 0.04
    nobody = bench.OtherCpuUse(own=lambda: 0.0).start()
    _spin(0.1)  # ten clock ticks of /proc/stat, whatever the machine's speed
    nobody.stop()
    assert nobody.own_seconds == 0.0 and (nobody.share is None or nobody.share > 0)  # our work counted as others'


def test_paired_speedup_cancels_a_drift_that_the_ratio_of_medians_keeps():
    # A model exactly 1.5x faster than the base, on a machine that slows down round after round,
    # with each model's median taken from different rounds (the base's slow first round).
    slowdown = [1.0, 0.6, 0.9, 0.5, 0.8]
    base = [10.0 * f for f in slowdown]
    model = [15.0 * f for f in slowdown]
    base[0] = 2.0  # one round where only the base was hit
    assert bench.paired_speedup(model, base) == pytest.approx(1.5)
    assert statistics.median(model) / statistics.median(base) != pytest.approx(1.5, abs=0.05)
    with pytest.raises(ValueError, match="same number of repeats"):
        bench.paired_speedup([1.0, 2.0], [1.0])


def test_evaluate_counts_what_each_image_keeps():
    """One pass, two modes: top-1/top-5 as computed by hand, per-image kept tokens equal to
    each image run alone, tokens per block their mean, top-k the same count for every image."""
    dense = _tiny_dense()
    model = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1, 2), keep_ratio=0.6, **TINY)
    model.load_state_dict({**dense.state_dict(), **{k: v for k, v in model.state_dict().items() if k not in dense.state_dict()}})
    randomize_(model.predictors, seed=3, scale=0.5)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, 32, 32, generator=g), torch.randint(0, 10, (10,), generator=g)
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    results = bench.evaluate_modes(model, loader, ("threshold", "topk"))
    assert set(results) == {"threshold", "topk"}
    with torch.no_grad():
        logits = model.forward_pruned(x, mode="threshold").logits
        alone = torch.stack([torch.stack([m.sum() for m in model.forward_pruned(x[i:i + 1], mode="threshold").keep_masks])
                             for i in range(10)]).float()
    r = results["threshold"]
    assert r.images == 10 and r.kept_tokens.shape == (10, 2)
    assert r.top1 == pytest.approx(100.0 * float((logits.argmax(-1) == y).float().mean()))
    assert r.top5 == pytest.approx(100.0 * float((logits.topk(5).indices == y[:, None]).any(1).float().mean()))
    torch.testing.assert_close(r.kept_tokens, alone)
    assert len(set(r.kept_tokens[:, 0].tolist())) > 1  # the spread this measures exists
    assert r.tokens_per_block == pytest.approx([16.0, *alone.mean(0).tolist(), float(alone[:, 1].mean())])
    topk = results["topk"].kept_tokens
    assert (topk == torch.tensor([round(0.6 * 16), round(0.36 * 16)]).float()).all()
    stats = bench.kept_token_stats(r.kept_tokens)
    assert [s["mean"] for s in stats] == pytest.approx(alone.mean(0).tolist())
    assert all(s["p5"] <= s["mean"] <= s["p95"] for s in stats)
    assert r.summary()["kept_tokens"] == stats and json.loads(json.dumps(r.summary()))
    assert bench.evaluate(model, loader, mode="topk").top1 == results["topk"].top1
    dense_result = bench.evaluate(dense, loader)
    assert dense_result.tokens_per_block == [16.0] * 4 and dense_result.kept_tokens.shape == (10, 0)
    with pytest.raises(ValueError, match="need a dynvit model"):
        bench.evaluate(dense, loader, mode="topk")


def test_kept_token_stats_percentiles():
    kept = torch.stack([torch.arange(101.0), 2 * torch.arange(101.0)], dim=1)  # 0..100 and 0..200
    assert bench.kept_token_stats(kept) == [{"mean": 50.0, "p5": 5.0, "p95": 95.0},
                                            {"mean": 100.0, "p5": 10.0, "p95": 190.0}]
    assert bench.kept_token_stats(torch.zeros(4, 0)) == []
    with pytest.raises(ValueError, match="images, stages"):
        bench.kept_token_stats(torch.zeros(4))


def test_spread_indices_cover_every_class_of_a_class_ordered_folder():
    targets = [c for c in range(10) for _ in range(100)]  # ImageFolder order: class by class
    for k in (10, 64, 250):
        ix = bench.spread_indices(len(targets), k)
        assert len(ix) == len(set(ix)) == k and ix == sorted(ix)
        counts = torch.bincount(torch.tensor([targets[i] for i in ix]), minlength=10)
        assert counts.min() >= k // 10 and counts.max() <= -(-k // 10) + 1  # the head alone would be class 0
    assert bench.spread_indices(5, 8) == [0, 1, 2, 3, 4] and bench.spread_indices(5, 0) == []


def test_masked_panels_blank_dropped_patches():
    images = torch.rand(2, 3, 16, 16) * 0.5
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True
    panels = masked_panels(images, [mask], (8, 8))
    assert panels.shape == (2, 2, 3, 16, 16)
    torch.testing.assert_close(panels[:, 0], images)
    torch.testing.assert_close(panels[0, 1, :, :8, 8:], images[0, :, :8, 8:])  # kept patch 1 (row 0, col 1)
    assert bool((panels[0, 1, :, 8:, :] == 1.0).all()) and bool((panels[1, 1, :, :8, :] == 1.0).all())


def test_eval_on_real_images(checkpoints, tmp_path, capsys):
    data = cifar_dir("test")
    out = tmp_path / "eval.json"
    cli = _eval_module()
    cli.main(["--checkpoint", str(checkpoints / "dynvit"), "--dense", str(checkpoints / "dense"),
              "--finetuned", f"evit={checkpoints / 'dense'}", "--data", str(data), "--limit", "40",
              "--batch-size", "16", "--workers", "0", "--flops-images", "4", "--no-speed", "--json", str(out)])
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "dynvit", "evit", "evit+ft", "random", "tome"}
    for name in rows:
        assert f"| {name} |" in table
    assert result["mode"] == "threshold" and all(r["images"] == 40 for r in rows.values())

    # The dense row is the unpatched model on the same images.
    dense = load_pretrained(checkpoints / "dense")
    dataset, _, _ = cli.load_data(cli.parse_args(["--model", "x", "--data", str(data), "--limit", "40"]), dense, 40)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([dataset.samples[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        top1 = 100.0 * float((dense(x).argmax(-1) == y).float().mean())
    assert rows["dense"]["top1"] == pytest.approx(top1)
    assert rows["dense"]["gmacs"] == pytest.approx(dynvit.count_flops(dense, (3, 32, 32)))
    assert rows["evit+ft"]["top1"] == rows["evit"]["top1"]  # the same weights here

    # Baselines keep what dynvit really kept; everything is cheaper than dense and consistent.
    n0 = 16
    kept = [rows["dynvit"]["tokens_per_block"][b] for b in (1, 2)]
    assert n0 > kept[0] >= kept[1] > 0
    assert rows["random"]["keep_ratio"] == pytest.approx([k / n0 for k in kept])
    assert [rows["random"]["tokens_per_block"][b] for b in (1, 2)] == [round(k) for k in kept]
    for name, row in rows.items():
        assert 0 <= row["top5"] - row["top1"] and row["top5"] <= 100
        assert row["gmacs_ratio"] == pytest.approx(row["gmacs"] / rows["dense"]["gmacs"])
        assert row["gmacs"] <= rows["dense"]["gmacs"] or name == "dynvit"
    assert max(rows[m]["gmacs"] for m in ("evit", "random")) < rows["dense"]["gmacs"]


def test_budget_calibrates_on_held_out_images(checkpoints, tmp_path, capsys):
    """--budget R: thresholds calibrated on images that are then left out of the measurement;
    the kept fraction meets R on the measured images, per-image counts spread around it."""
    out, hist = tmp_path / "eval.json", tmp_path / "kept.png"
    cli = _eval_module()
    cli.main(["--checkpoint", str(checkpoints / "dynvit"), "--data", str(cifar_dir("test")), "--methods", "dense,dynvit",
              "--budget", "0.6", "--calib-images", "200", "--limit", "200", "--batch-size", "50", "--workers", "0",
              "--flops-images", "4", "--no-speed", "--json", str(out), "--hist", str(hist)])
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert "calibrated to 0.60/0.36 on 200 held-out images" in text
    cal, row = result["calibration"], result["rows"][1]
    assert cal["images"] == 200 and len(cal["thresholds"]) == 2 and row["images"] == 200
    kept = [k["mean"] / 16 for k in row["kept_tokens"]]
    assert kept == pytest.approx([0.6, 0.36], abs=0.05)
    assert row["kept_tokens"][0]["p5"] < row["kept_tokens"][0]["p95"], "threshold mode keeps per-image counts"
    assert "kept per image" in text and hist.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the held-out images are not among the measured ones
    dense = load_pretrained(checkpoints / "dense")
    args = cli.parse_args(["--model", "x", "--data", str(cifar_dir("test"))])
    measured, _, held = cli.load_data(args, dense, 200, hold_out=200)
    paths = [{path for path, _ in ds.samples} for ds in (measured, held)]
    assert not paths[0] & paths[1] and len(held) == 200 and len(measured) == 200


def test_sweep_has_calibrated_threshold_beside_topk(checkpoints, tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    _eval_module().main(["--checkpoint", str(checkpoints / "dynvit"), "--data", str(cifar_dir("test")),
                         "--methods", "dense,dynvit,random", "--sweep", "0.8,0.5", "--calib-images", "100", "--limit", "60",
                         "--batch-size", "30", "--workers", "0", "--flops-images", "4", "--json", str(out), "--plot", str(png)])
    sweep = json.loads(out.read_text())["sweep"]
    for step in sweep:
        curves = {r.get("curve", r["method"]): r for r in step["rows"]}
        assert {"dynvit top-k", "dynvit threshold (calibrated)", "random", "dense"} <= set(curves)
        calibrated, topk = curves["dynvit threshold (calibrated)"], curves["dynvit top-k"]
        r = step["keep_ratio"]
        assert calibrated["kept_tokens"][1]["mean"] / 16 == pytest.approx(r * r, abs=0.08)
        assert topk["tokens_per_block"][2] == round(16 * r * r)
    low, high = (sweep[1]["rows"], sweep[0]["rows"])
    assert max(r["gmacs"] for r in low if r["method"] == "dynvit") < min(r["gmacs"] for r in high if r["method"] == "dynvit")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_budget_arguments_are_refused(checkpoints, capsys):
    cli = _eval_module()
    with pytest.raises(SystemExit):
        cli.parse_args(["--checkpoint", "x", "--data", "y", "--budget", "0.5", "--mode", "topk"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--checkpoint", "x", "--budget", "0.5"])  # no data
    with pytest.raises(SystemExit):
        cli.parse_args(["--checkpoint", "x", "--data", "y", "--budget", "1.5"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["--checkpoint", str(checkpoints / "dynvit"), "--data", str(cifar_dir("test")), "--budget", "0.5",
                  "--calib-images", "10000", "--workers", "0", "--no-speed", "--methods", "dense,dynvit"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: --calib-images 10000 leaves no image of {cifar_dir('test')} to evaluate; "
                                       "hold out fewer or calibrate on another split (--calib-split)\n")


def test_argument_errors_are_one_line(capsys):
    cli = _eval_module()
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--checkpoint", "x", "--keep-ratio", "1.5"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --model.keep_ratio must be in (0, 1], got [1.5]: r keeps r**s of the "
                                       "patch tokens after stage s (e.g. 0.7), or give one cumulative fraction per "
                                       "stage (see eval.py --help)\n")
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--keep-ratio", "0.5"])  # neither --checkpoint nor --model.name
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_visualize_writes_png(checkpoints, tmp_path):
    png = tmp_path / "masks.png"
    _eval_module().main(["--checkpoint", str(checkpoints / "dynvit"), "--data", str(cifar_dir("test")),
                         "--visualize", "6", "--workers", "0", "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the command line ----------------------------------------------------------------------
def test_training_names_and_old_names_mean_the_same():
    cli = _eval_module()
    new = cli.parse_args(["--model.name", "m", "--data.path", "d", "--model.keep_ratio", "[0.8, 0.5]", "--train.seed", "3",
                          "--data.num_workers", "1", "--model.prune_loc", "[1,2]", "--model.tome_r", "2",
                          "--data.val_batch_size", "8", "--model.kwargs", "{img_size: 32}"])
    old = cli.parse_args(["--model", "m", "--data", "d", "--keep-ratio", "0.8,0.5", "--seed", "3", "--workers", "1",
                          "--prune-loc", "1,2", "--tome-r", "2", "--batch-size", "8", "--model-kwargs", "{img_size: 32}"])
    assert vars(new) == vars(old)
    assert (new.keep_ratio, new.seed, new.workers, new.prune_loc, new.batch_size) == ([0.8, 0.5], 3, 1, [1, 2], 8)


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        _eval_module().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--data.num_workers WORKERS, --workers WORKERS data loader workers (default: 2)" in out
    assert "--train.seed SEED, --seed SEED seed of the image subset and of random dropping (default: 0)" in out
    assert "--calib-images CALIB_IMAGES images held out of the split for --budget/--sweep (default: 1000)" in out


def test_pretrained_reaches_timm(monkeypatch, tmp_path):
    """--model.name NAME --pretrained asks timm for the hub's weights (no network here: the
    call is recorded and answered with random weights)."""
    cli = _eval_module()
    calls = []
    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(cli.timm, "create_model", create_model)
    cli.main(["--model.name", "vit_tiny_patch16_224", "--pretrained", "--model.kwargs", TINY_YAML, "--methods", "dense",
              "--flops-only", "--json", str(tmp_path / "e.json")])
    assert calls[0] == ("vit_tiny_patch16_224", True, TINY)
    with pytest.raises(SystemExit):
        cli.parse_args(["--checkpoint", "x", "--pretrained"])  # a checkpoint has its own weights


def test_checkpoint_from_the_hub_cache(checkpoints, offline_hub, tmp_path):
    from conftest import populate_hf_cache

    populate_hf_cache(offline_hub, "someone/tiny-dynvit", checkpoints / "dynvit")
    out = tmp_path / "hub.json"
    _eval_module().main(["--checkpoint", "hf-hub:someone/tiny-dynvit", "--data.path", str(cifar_dir("test")),
                         "--limit", "20", "--data.num_workers", "0", "--methods", "dense,dynvit", "--no-speed",
                         "--flops-images", "2", "--json", str(out)])
    local = tmp_path / "local.json"
    _eval_module().main(["--checkpoint", str(checkpoints / "dynvit"), "--data.path", str(cifar_dir("test")),
                         "--limit", "20", "--data.num_workers", "0", "--methods", "dense,dynvit", "--no-speed",
                         "--flops-images", "2", "--json", str(local)])
    strip = lambda rows: [{k: v for k, v in r.items()} for r in rows]  # noqa: E731
    assert strip(json.loads(out.read_text())["rows"]) == strip(json.loads(local.read_text())["rows"])


class _Terminal:
    """A stderr that says it is a terminal, so tqdm draws its bars into it."""

    def __init__(self):
        self.text = []

    def write(self, s):
        self.text.append(s)

    def flush(self):
        pass

    def isatty(self):
        return True


@pytest.mark.parametrize("flag", [[], ["--no-progress"]])
def test_progress_bars_over_methods_and_batches(checkpoints, monkeypatch, tmp_path, flag):
    from dynvit import progress

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(progress, "_enabled", True)
    _eval_module().main(["--checkpoint", str(checkpoints / "dynvit"), "--data.path", str(cifar_dir("test")), "--limit",
                         "20", "--data.num_workers", "0", "--methods", "dense,dynvit,random", "--no-speed",
                         "--flops-images", "2", "--json", str(tmp_path / "e.json"), *flag])
    drawn = "".join(terminal.text)
    for bar in ("methods: 100%", "accuracy (threshold): ", "accuracy (none): ", "decoding images: "):
        assert (bar in drawn) is not bool(flag), bar


def test_a_progress_bar_over_the_timing_repeats(monkeypatch):
    from dynvit import progress

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(progress, "_enabled", True)
    models = {"a": _tiny_dense(), "b": _tiny_dense(1)}
    bench.measure_speed(models, torch.randn(4, 3, 32, 32), (1, 2), repeats=3, warmup=0, min_seconds=0.001)
    drawn = "".join(terminal.text)
    assert "timing:   0%|          | 0/12 [" in drawn  # 2 batch sizes x 3 repeats x 2 models
