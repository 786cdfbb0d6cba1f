"""Training on real CIFAR-10 images: the loss goes down, runs resume exactly, errors are clear,
and two processes train what one does."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from accelerate.utils import set_seed
from PIL import Image
from safetensors.torch import load_file

import dynvit
from conftest import CIFAR10, REPO, cifar_dir
from dynvit.config import ConfigError, load_config
from dynvit.data import DataError, SeededImageDataset, build_datasets, build_transform, scan_image_folder
from dynvit.hub import load_pretrained
from dynvit.losses import PruningLoss, classification_criterion
from dynvit.training import create_model, create_teacher

sys.path.insert(0, str(REPO))
from train import main, train  # noqa: E402

QUICK_EVAL = ["--train.eval_modes", "[topk]", "--train.flops_images", "0"]
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=10)


pytestmark = pytest.mark.usefixtures("one_thread")


def smoke(out, *overrides):
    cifar_dir("train")
    return load_config(REPO / "configs" / "smoke.yaml",
                       ["--data.path", str(CIFAR10), "--train.output_dir", str(out), *overrides])


def real_batch(n=48):
    folder = scan_image_folder(cifar_dir("train"))
    step = len(folder) // n
    data_config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3,
                   "crop_pct": 1.0}
    ds = SeededImageDataset(folder, build_transform(data_config, is_training=False), indices=range(0, n * step, step))
    images, labels = zip(*(ds[i] for i in range(n)))
    return torch.stack(images), torch.tensor(labels)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    return load_file(path / "final" / "model.safetensors")


# ---- optimisation -------------------------------------------------------------------------
def test_a_few_steps_lower_the_loss():
    images, labels = real_batch()
    torch.manual_seed(0)
    model = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1, 2), keep_ratio=0.7, **TINY)
    teacher = create_teacher(model)
    net = dynvit.TrainingModel(model).train()
    criterion = PruningLoss(classification_criterion(mixup=False, smoothing=0.0), model.keep_ratio)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)

    def loss(seed=0):
        torch.manual_seed(seed)  # the same Gumbel noise for the before/after comparison
        with torch.no_grad():
            tokens = teacher.forward_features(images)
            return criterion(net(images), labels, teacher.forward_head(tokens), tokens, model.num_prefix_tokens)

    before = loss()
    for _ in range(15):
        tokens = teacher.forward_features(images)
        terms = criterion(net(images), labels, teacher.forward_head(tokens), tokens, model.num_prefix_tokens)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
    after = loss()
    assert after.total < 0.8 * before.total, (before, after)
    assert after.cls < before.cls


def test_ratio_term_pulls_the_kept_fraction_to_its_target():
    images, labels = real_batch(32)
    torch.manual_seed(0)
    model = dynvit.build_model("vit_tiny_patch16_224", prune_loc=(1,), keep_ratio=0.3, **TINY)
    with torch.no_grad():
        model.predictors[0].out_mlp[-1].bias.fill_(4.0)  # starts keeping ~98% of the tokens
    net = dynvit.TrainingModel(model).train()
    criterion = PruningLoss(classification_criterion(mixup=False, smoothing=0.0), model.keep_ratio,
                            cls_weight=0.0, distill_logits_weight=0.0, distill_tokens_weight=0.0)  # the ratio term alone
    optimizer = torch.optim.AdamW(model.predictors.parameters(), lr=1e-2)

    def kept_fraction():
        with torch.no_grad():
            return float(torch.sigmoid(net(images).keep_logits[0]).mean())

    before = kept_fraction()
    for _ in range(25):
        terms = criterion(net(images), labels)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
    after = kept_fraction()
    assert before > 0.9
    assert abs(after - 0.3) < 0.3 * abs(before - 0.3), (before, after)


# ---- a whole run --------------------------------------------------------------------------
def test_a_run_writes_config_metrics_checkpoints_and_model(tmp_path):
    cfg = smoke(tmp_path)
    result = train(cfg)
    assert load_config(tmp_path / "config.yaml") == cfg
    records = read_metrics(tmp_path)
    train_keys = set().union(*(r for r in records if "train/total" in r))
    assert {"train/cls", "train/ratio", "train/distill_logits", "train/distill_tokens", "train/tau",
            "train/kept_frac_stage0", "lr/predictors_decay", "lr/backbone_decay"} <= train_keys
    val = [r for r in records if "val/top1_threshold" in r]
    assert [r["epoch"] for r in val] == [0, 1]
    assert {"val/top1_topk", "val/top1_none", "val/kept_tokens_threshold_stage1", "val/gmacs_threshold",
            "val/gmacs_none"} <= set(val[-1])
    assert val[-1]["val/gmacs_topk"] < val[-1]["val/gmacs_none"]
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000008"
    assert {"model.safetensors", "optimizer.bin", "config.yaml"} <= set(os.listdir(tmp_path / "checkpoints" / latest))
    model = load_pretrained(result["final_dir"])
    assert model.dynvit_meta["classes"] == sorted(os.listdir(CIFAR10 / "train"))


# data.cache memory: images decoded once, crops/flips and random erasing drawn on the batch tensors
CACHES = {"none": [], "memory": ["--data.cache", "memory", "--aug.re_prob", "0.25"]}


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_killed_and_resumed_run_ends_with_the_same_weights_tau_and_noise_scale(tmp_path, cache):
    common = ["--aug.mixup", "0.8", "--aug.smoothing", "0.1", "--model.drop_path_rate", "0.1",
              "--tau.kind", "linear", "--tau.tau_end", "0.2", "--noise.kind", "cosine", "--noise.scale_end", "0",
              "--noise.anneal_epochs", "1.5", "--model.dropped_tokens", "merge", "--model.predictor_prior", "match",
              "--train.log_every", "1", "--data.num_workers", "1", *CACHES[cache], *QUICK_EVAL]
    train(smoke(tmp_path / "whole", *common))
    stopped = train(smoke(tmp_path / "cut", *common, "--train.stop_after_steps", "3"))  # mid-epoch (4 steps each)
    assert stopped["step"] == 3 and "final_dir" not in stopped
    (tmp_path / "cut" / "checkpoints" / ".step_00000004.tmp").mkdir()  # a save that crashed half-way
    train(smoke(tmp_path / "cut", *common, "--train.resume", "auto"))

    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole, cut = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    after_resume = [r for r in cut if r["step"] > 3 and "train/total" in r]
    same_steps = [r for r in whole if r["step"] > 3 and "train/total" in r]
    drop_time = lambda records: [{k: v for k, v in r.items() if k != "time"} for r in records]  # noqa: E731
    assert drop_time(after_resume) == drop_time(same_steps)  # losses, tau and learning rates, step by step
    assert after_resume[-1]["train/tau"] == pytest.approx(0.2 + 0.8 / 8)
    # The resume lands in the middle of the noise annealing (6 steps of 8) and continues it.
    scales = [r["train/noise_scale"] for r in after_resume]
    assert 0 < scales[0] < 1 and scales[-1] == 0.0 and scales == sorted(scales, reverse=True)


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004\n")
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run; resume it"):
        train(smoke(tmp_path))
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.slow
def test_sigkill_during_training_then_resume(tmp_path):
    """A real kill -9 of a run that checkpoints every step, then --resume."""
    cifar_dir("train")
    args = ["--data.path", str(CIFAR10), "--train.save_every_steps", "1", "--train.epochs", "3"]
    train(smoke(tmp_path / "whole", *args[2:]))
    out = tmp_path / "killed"
    cmd = [sys.executable, "train.py", "--config", "configs/smoke.yaml", "--train.output_dir", str(out), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = out / "checkpoints" / "latest"
    while proc.poll() is None and not (pointer.exists() and pointer.read_text().strip() >= "step_00000006"):
        time.sleep(0.05)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    subprocess.run(cmd + ["--resume"], cwd=REPO, check=True, capture_output=True)
    a, b = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- errors ---------------------------------------------------------------------------------
def test_data_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "noimages" / "cat").mkdir(parents=True)
    (tmp_path / "noimages" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="cat"):
        scan_image_folder(tmp_path / "noimages")

    for split, classes in (("train", ["cat", "dog"]), ("val", ["cat", "cow"])):
        for c in classes:
            (tmp_path / "ds" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "ds" / split / c / "0.png")
    cfg = smoke(tmp_path / "run", "--data.path", str(tmp_path / "ds"), "--data.val_split", "val")
    with pytest.raises(DataError, match=r"only in training \['dog'\], only in validation \['cow'\]"):
        build_datasets(cfg.data, cfg.aug, {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0,) * 3,
                                           "std": (1,) * 3, "crop_pct": 1.0}, seed=0)
    (tmp_path / "ds" / "train" / "dog" / "0.png").write_bytes(b"not a png")
    folder = scan_image_folder(tmp_path / "ds" / "train")
    with pytest.raises(DataError, match=r"cannot read image .*dog.*0\.png"):
        SeededImageDataset(folder, lambda im: im)[1]


def test_gradient_accumulation_trains_what_one_big_batch_does(tmp_path):
    """Two micro-batches of 8 per step end where batches of 16 end (deterministic sampling, as
    the Gumbel noise of a micro-batch is drawn on its own)."""
    common = ["--model.sampler", "deterministic", *QUICK_EVAL]
    train(smoke(tmp_path / "big", *common))
    train(smoke(tmp_path / "accum", *common, "--optim.grad_accum_steps", "2"))
    a, b = weights(tmp_path / "big"), weights(tmp_path / "accum")
    assert torch.cat([(a[k] - b[k]).flatten() for k in a]).norm() < 1e-3


# ---- several processes ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_two_cpu_processes_train_what_one_does(tmp_path, cache):
    """The smoke run with the same global batch (16 = 2 x 8) on two gloo processes ends where
    one process ends, up to float rounding: each process gets its half of every global batch,
    with the crops and flips that image gets in the one-process run.

    Sampling is deterministic here: with Gumbel sampling each process draws its own noise, so
    the second half-batch sees different masks than in the one-process run (after the 8 steps
    of this run that alone moves the weights by about half of their update)."""
    sampler = ["--model.sampler", "deterministic", "--data.cache", cache, *QUICK_EVAL]
    cfg = smoke(tmp_path / "one", *sampler)
    set_seed(cfg.train.seed)
    initial = create_model(cfg, num_classes=10).state_dict()
    train(cfg)
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "train.py", "--config", "configs/smoke.yaml",
           "--data.path", str(CIFAR10), "--train.output_dir", str(tmp_path / "two"), *sampler]
    # Accelerate sets up gloo CPU training only when told to use the CPU (see README).
    run = subprocess.run(cmd, cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stderr
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    update = torch.cat([(one[k] - initial[k]).flatten() for k in one]).norm()
    gap = torch.cat([(one[k] - two[k]).flatten() for k in one]).norm()
    assert update > 0.1 and gap < 1e-3 * update, (float(gap), float(update))


# ---- baselines through the same loop -------------------------------------------------------------
@pytest.mark.parametrize("method, extra", [("evit", []), ("tome", ["--model.tome_r", "2"])])
def test_baselines_fine_tune_through_train_py(tmp_path, method, extra):
    from train import train

    dense = train(smoke(tmp_path / "dense", "--model.prune_loc", "[]", "--train.epochs", "1"))
    result = train(smoke(tmp_path / method, "--model.method", method, *extra, "--train.epochs", "1",
                         "--model.pretrained_path", dense["final_dir"]))
    records = read_metrics(tmp_path / method)
    train_rows = [r for r in records if "train/distill_logits" in r]
    assert train_rows and train_rows[-1]["train/distill_logits"] > 0  # distilled from the dense teacher
    assert 0 <= result["top1_none"] <= 100
    # GMACs are those of the reduced model, below the dense run's
    assert result["gmacs_none"] < dense["gmacs_none"]


def test_baseline_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="tome_r"):
        smoke(tmp_path, "--model.method", "tome")
    with pytest.raises(ConfigError, match="must be one of"):
        smoke(tmp_path, "--model.method", "dyvit")


# ---- the end of a run: calibrated, saved with its card --------------------------------------------
def _kept_fractions(final_dir, folder_split="test", images=500, seed=0):
    """Threshold mode of the saved model on ``images`` test images (never calibrated on)."""
    from dynvit.benchmark import evaluate
    from dynvit.data import balanced_subset

    model = load_pretrained(final_dir)
    folder = scan_image_folder(cifar_dir(folder_split))
    data_config = timm_data_config(model)
    ds = SeededImageDataset(folder, build_transform(data_config, is_training=False),
                            indices=balanced_subset(folder.targets, images, seed + 7))
    loader = torch.utils.data.DataLoader(ds, batch_size=100)
    kept = evaluate(model, loader, mode="threshold").kept_tokens.mean(0) / model.patch_embed.num_patches
    return model, kept.tolist()


def timm_data_config(model):
    import timm.data

    return timm.data.resolve_model_data_config(model)


def test_a_run_ends_with_threshold_mode_calibrated_to_its_budget(tmp_path):
    result = train(smoke(tmp_path / "cal", "--train.calibrate_images", "500", "--train.epochs", "1", *QUICK_EVAL))
    model, kept = _kept_fractions(result["final_dir"])
    assert model.keep_threshold.tolist() == pytest.approx(result["thresholds"]) and min(result["thresholds"]) > 0
    assert kept == pytest.approx(list(model.keep_ratio), abs=0.02), kept  # (0.7, 0.49) on held-out images
    evaluation = json.loads((tmp_path / "cal" / "final" / "eval.json").read_text())
    rows = {r["mode"]: r for r in evaluation["rows"]}
    assert rows["threshold"]["setting"] == "threshold, calibrated to 0.700/0.490 on 500 held-out training images"
    assert rows["threshold"]["top1"] == result["calibrated_top1_threshold"]
    card = (tmp_path / "cal" / "final" / "README.md").read_text()
    assert "| dynvit | threshold, calibrated to 0.700/0.490 on 500 held-out training images |" in card
    assert "train_subset: 64" in card  # the training config

    off = train(smoke(tmp_path / "off", "--train.calibrate_images", "0", "--train.epochs", "1", *QUICK_EVAL))
    model, kept = _kept_fractions(off["final_dir"], images=100)
    assert model.keep_threshold.tolist() == [0.0, 0.0] and min(kept) > 0.9  # probability > 0.5: nearly everything


@pytest.mark.slow
def test_a_deit_preset_run_meets_its_budget_in_threshold_mode(tmp_path):
    """DynamicViT's DeiT recipe (configs/deit_tiny_dynamicvit.yaml) for a few steps on CIFAR-10 at 32x32
    on the CPU: the saved model, in its default threshold mode, keeps its target within 0.02 on
    images it was not calibrated on."""
    cfg = load_config(REPO / "configs" / "deit_tiny_dynamicvit.yaml", [
        "--model.pretrained", "false", "--model.kwargs", "{img_size: 32, patch_size: 4}", "--data.path", str(CIFAR10),
        "--data.val_split", "test", "--data.input_size", "32", "--data.crop_pct", "1.0", "--data.batch_size", "16",
        "--data.val_batch_size", "100", "--data.train_subset", "64", "--data.val_subset", "200", "--data.num_workers", "1",
        "--train.epochs", "1", "--train.output_dir", str(tmp_path), "--train.trackers", "[]", "--train.flops_images", "0",
        "--train.eval_modes", "[threshold]", "--optim.ema", "false", "--train.mixed_precision", "no"])
    result = train(cfg)
    model, kept = _kept_fractions(result["final_dir"], images=1000)
    assert model.prune_mode == "threshold" and list(model.keep_ratio) == pytest.approx([0.7, 0.49, 0.343])
    assert kept == pytest.approx(list(model.keep_ratio), abs=0.02), kept
