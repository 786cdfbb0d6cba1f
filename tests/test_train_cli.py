"""train.py as a user meets it: every key documented in --help, user errors as one line before
any work, the launcher deciding precision and accumulation, timm's schedulers, progress lines."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import CIFAR10, REPO, cifar_dir
from dynvit.cli import field_comments
from dynvit.config import Config, ConfigError, load_config
from dynvit.preflight import LaunchSettings, launch_settings, launcher_argv
from dynvit.training import create_accelerator, create_scheduler

sys.path.insert(0, str(REPO))
import train as train_script  # noqa: E402

SMOKE = str(REPO / "configs" / "smoke.yaml")
PRESETS = sorted((REPO / "configs").glob("*.yaml"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's state is a process-wide singleton whose precision cannot change once set."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def run_main(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        train_script.main(args)
    return e.value.code, capsys.readouterr().err


# ---- --help -------------------------------------------------------------------------------
def test_help_lists_every_key_with_its_default_and_comment(capsys):
    code = None
    with pytest.raises(SystemExit) as e:
        train_script.main(["--help"])
    code = e.value.code
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare the words
    assert code == 0
    cfg = Config()
    keys = 0
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        comments = field_comments(type(sub))
        for f in dataclasses.fields(sub):
            keys += 1
            assert f.name in comments, f"{section.name}.{f.name} has no comment in dynvit/config.py"
            assert f"--{section.name}.{f.name} " in out
            assert " ".join(comments[f.name].split()) in out, (section.name, f.name)
    assert keys > 90
    assert "--model.sampler {gumbel,deterministic,soft} training-time mask sampler: gumbel, deterministic or soft " \
           "(default: gumbel)" in out
    assert "--optim.grad_accum_steps INT micro-batches per step; null = accelerate launch's " \
           "--gradient_accumulation_steps, else 1 (default: null)" in out
    assert "--model.prune_loc LIST (default: [3, 6, 9])" not in out  # the comment comes first
    assert "blocks before which tokens are pruned; [] = dense (default: [3, 6, 9])" in out


def test_documented_flags_parse_like_overrides(tmp_path):
    parser = train_script.build_parser()
    args, rest = parser.parse_known_args(["--optim.lr", "3e-4", "--model.kwargs", "{depth: 6}", "--model.kwargs.depth",
                                          "5", "--train.trackers=[]"])
    from dynvit.cli import config_overrides

    cfg = load_config(SMOKE, config_overrides(args) + rest)
    assert cfg.optim.lr == 3e-4 and cfg.model.kwargs == {"depth": 5} and cfg.train.trackers == []


# ---- one-line errors before any work ------------------------------------------------------------
def _smoke_args(tmp_path, *extra):
    return ["--config", SMOKE, "--data.path", str(CIFAR10), "--train.output_dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--model.keep_ratio", "1.5"],
     "model.keep_ratio must be in (0, 1], got 1.5; --model.keep_ratio r keeps r**s of the patch tokens after stage s "
     "(e.g. 0.7), or give one cumulative fraction per stage"),
    (["--model.prune_loc", "[1,5]"],
     "model.prune_loc (1, 5) is out of range: this model has 4 blocks, so indices must be in [0, 3]"),
    (["--train.mixed_precision", "fp16"],
     "train.mixed_precision=fp16 needs a CUDA GPU and this run has none; use bf16 or no (--train.mixed_precision bf16)"),
    (["--optim.grad_accum_steps", "3"],
     "data.batch_size=16 (the global batch) is not a multiple of 1 process(es) x 3 accumulation step(s) = 3; use a "
     "multiple, e.g. --data.batch_size 18, or change optim.grad_accum_steps"),
    (["--train.resume", "/no/such/dir"],
     "train.resume: no checkpoint folder '/no/such/dir'; give auto, a run's checkpoints folder or one of its step_* "
     "folders, or \"\" to start fresh"),
    (["--train.trackers", "[tensorbord]"],
     "train.trackers: 'tensorbord' is not an Accelerate tracker; did you mean 'tensorboard'? Choose from aim, clearml, "
     "comet_ml, dvclive, mlflow, swanlab, tensorboard, trackio, wandb, or [] for none"),
    (["--model.name", "vit_tiny_patch16_22"],
     "model.name: 'vit_tiny_patch16_22' is not a timm model; did you mean 'vit_tiny_patch16_224'? "
     "timm.list_models('*vit*') lists them"),
    (["--optim.lrr", "1"], None),  # an unknown key: the message lists the valid ones (tests/test_config.py)
])
def test_user_errors_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, extra, message):
    cifar_dir("train")
    monkeypatch.setattr(train_script, "scan_image_folder", lambda *a, **k: pytest.fail("data scanned before the check"))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    code, err = run_main(_smoke_args(tmp_path, *extra), capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    if message is not None:
        assert err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()  # nothing written


def test_unset_data_path_says_so(tmp_path, capsys):
    code, err = run_main(["--train.output_dir", str(tmp_path / "out")], capsys)
    assert (code, err) == (2, "error: data.path is unset: give --data.path DIR (a folder holding the train and val image "
                              "folders, one sub-folder per class) or a --config preset that sets it\n")
    code, err = run_main(_smoke_args(tmp_path, "--data.path", str(tmp_path / "nowhere")), capsys)
    assert (code, err) == (2, f"error: data.path: training folder '{tmp_path / 'nowhere' / 'train'}' does not exist; "
                              "data.path must hold the 'train' split (data.train_split), one sub-folder of images per class\n")
    assert not (tmp_path / "out").exists()


def _image_folder(root, *, corrupt=()):
    """root/{train,val}/{cat,dog}/{0..4}.png; the files named in ``corrupt`` hold no image."""
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (8, 8), (40 * i, 100 * c, 0)).save(root / split / cls / f"{i}.png")
    for name in corrupt:
        (root / name).write_bytes(b"not a png")


def _tiny_data_args(root):
    return ["--data.path", str(root), "--data.val_split", "val", "--data.train_subset", "0", "--data.val_subset", "0",
            "--data.batch_size", "4", "--data.val_batch_size", "4", "--train.calibrate_images", "0",
            "--train.flops_images", "0", "--train.epochs", "1"]


def test_a_loader_workers_error_is_its_own_message(tmp_path, capsys):
    bad = tmp_path / "ds" / "train" / "dog" / "3.png"
    _image_folder(tmp_path / "ds", corrupt=["train/dog/3.png"])
    code, err = run_main(_smoke_args(tmp_path, *_tiny_data_args(tmp_path / "ds"), "--data.num_workers", "1"), capsys)
    assert code == 2
    assert err == (f"error: cannot read image '{bad}': cannot identify image file '{bad}'; remove or replace it "
                   "(data.verify: true lists every unreadable image before training)\n")


def test_verify_lists_every_unreadable_image_before_training(tmp_path, capsys):
    _image_folder(tmp_path / "ds", corrupt=["train/dog/3.png", "val/cat/0.png", "train/cat/1.png"])
    code, err = run_main(_smoke_args(tmp_path, *_tiny_data_args(tmp_path / "ds"), "--data.verify", "true",
                                     "--data.num_workers", "2"), capsys)
    bad = [tmp_path / "ds" / p for p in ("train/cat/1.png", "train/dog/3.png", "val/cat/0.png")]
    listed = "; ".join(f"{p} (UnidentifiedImageError: cannot identify image file '{p}')" for p in bad)
    assert code == 2
    assert err == f"error: 3 of 20 images cannot be read: {listed}; remove or replace them, then run again\n"
    assert not (tmp_path / "out" / "checkpoints" / "latest").exists()  # no step was trained


# ---- the launcher decides -------------------------------------------------------------------------
def test_the_launchers_environment_sets_the_accelerator(tmp_path, monkeypatch, fresh_accelerate_state):
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` exports
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    cfg = load_config(SMOKE, ["--train.output_dir", str(tmp_path)])
    assert cfg.train.mixed_precision is None and cfg.optim.grad_accum_steps is None  # unset: the launcher's
    launch = launch_settings(cfg, argv=[])
    assert launch == LaunchSettings("bf16", 2, 1)
    accelerator = create_accelerator(cfg, launch)
    assert accelerator.mixed_precision == "bf16" and AcceleratorState().mixed_precision == "bf16"
    assert accelerator.gradient_accumulation_steps == 2 and accelerator.gradient_state.num_steps == 2


def test_a_value_set_in_the_config_wins_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    cfg = load_config(SMOKE, ["--train.mixed_precision", "no", "--optim.grad_accum_steps", "4"])
    with caplog.at_level(logging.WARNING, logger="dynvit.preflight"):
        assert launch_settings(cfg, argv=[]) == LaunchSettings("no", 4, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "train.mixed_precision=no from the config overrides the launcher's bf16 (accelerate launch --mixed_precision / "
        "ACCELERATE_MIXED_PRECISION); unset it (null) to follow the launcher",
        "optim.grad_accum_steps=4 from the config overrides the launcher's 2 (accelerate launch "
        "--gradient_accumulation_steps); unset it (null) to follow the launcher"]
    caplog.clear()
    same = load_config(SMOKE, ["--train.mixed_precision", "bf16"])
    with caplog.at_level(logging.WARNING, logger="dynvit.preflight"):
        assert launch_settings(same, argv=[]).mixed_precision == "bf16"
    assert not caplog.records  # agreeing values: nothing to say


def test_accumulation_from_the_launchers_command_line(tmp_path, monkeypatch):
    """`accelerate launch` exports --gradient_accumulation_steps for DeepSpeed only; the
    script reads it from the launcher's command line (its parent process)."""
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", raising=False)
    cfg = load_config(SMOKE)
    argv = ["--mixed_precision", "bf16", "--gradient_accumulation_steps", "2", "train.py", "--config", "x"]
    assert launch_settings(cfg, environ={}, argv=argv) == LaunchSettings("no", 2, 1)
    assert launch_settings(cfg, environ={}, argv=["train.py"]) == LaunchSettings("no", 1, 1)
    fake = tmp_path / "accelerate"  # a process whose command line reads like the launcher's
    fake.write_text("import time\ntime.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, str(fake), "launch", "--gradient_accumulation_steps", "3", "train.py"])
    try:
        for _ in range(200):  # until the new process has its command line
            if launcher_argv(proc.pid):
                break
            time.sleep(0.05)
        assert launcher_argv(proc.pid) == ["--gradient_accumulation_steps", "3", "train.py"]
    finally:
        proc.kill()
        proc.wait()
    assert launcher_argv(os.getpid()) is None  # pytest is no launcher


@pytest.mark.slow
def test_accelerate_launch_bf16_with_accumulation_2(tmp_path):
    """The real launcher: its flags reach the run, and the log says so."""
    import shutil

    cifar_dir("train")
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    cmd = [launcher, "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
           "--mixed_precision", "bf16", "--gradient_accumulation_steps", "2", "train.py", "--config", "configs/smoke.yaml",
           "--data.path", str(CIFAR10), "--train.output_dir", str(tmp_path), "--train.epochs", "1"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mixed precision bf16, gradient accumulation 2 (8 images per micro-batch)" in run.stderr


# ---- timm's schedulers ------------------------------------------------------------------------
def _lrs(scheduler, optimizer, steps):
    out = []
    for step in range(steps):
        scheduler.step_update(step)
        out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_the_default_cosine_gives_todays_learning_rates(preset):
    from timm.scheduler import create_scheduler_v2

    cfg = load_config(preset)
    assert cfg.optim.sched == "cosine"
    steps_per_epoch = 7
    before, after = (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr) for _ in range(2))
    today, _ = create_scheduler_v2(before, sched="cosine", num_epochs=cfg.train.epochs, min_lr=cfg.optim.min_lr,
                                   warmup_lr=cfg.optim.warmup_lr, warmup_epochs=cfg.optim.warmup_epochs, warmup_prefix=True,
                                   step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    steps = (cfg.train.epochs + 2) * steps_per_epoch
    assert _lrs(create_scheduler(after, cfg, steps_per_epoch), after, steps) == _lrs(today, before, steps)


def test_a_timm_step_schedule():
    cfg = load_config(SMOKE, ["--optim.sched", "step", "--optim.decay_epochs", "1", "--optim.decay_rate", "0.5",
                              "--train.epochs", "3"])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    lrs = _lrs(create_scheduler(optimizer, cfg, 4), optimizer, 12)
    assert lrs == pytest.approx([1e-3] * 4 + [5e-4] * 4 + [2.5e-4] * 4)
    with pytest.raises(ConfigError, match=r"optim.sched: must be one of .*'cosine'.*got 'plateau'"):
        load_config(SMOKE, ["--optim.sched", "plateau"])


# ---- what a run prints --------------------------------------------------------------------------
def test_a_run_logs_compact_lines_and_a_validation_table(tmp_path, caplog):
    cifar_dir("train")
    cfg = load_config(SMOKE, ["--data.path", str(CIFAR10), "--train.output_dir", str(tmp_path),
                              "--train.eval_modes", "[threshold, topk]", "--train.calibrate_images", "0"])
    with caplog.at_level(logging.INFO):
        train_script.train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "train"]
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["2/8", "4/8", "6/8", "8/8"]  # every log_every = 2 steps, bar off
    pattern = r"step \d/8 \(epoch \d\) loss \d\.\d{4} lr \d\.\de-0\d \d+ img/s kept 0\.\d\d/0\.\d\d tau 1\.00 noise 1\.00 eta 0:\d\d"
    assert all(re.fullmatch(pattern, line) for line in steps), steps
    table = [line for line in lines if line.startswith("validation after epoch 1")][0].splitlines()
    assert table[1].split()[:4] == ["mode", "top-1", "top-5", "GMACs"]
    assert [row.split()[0] for row in table[2:]] == ["threshold", "topk"]
    assert not [r for r in caplog.records if r.name.startswith("accelerate.") and r.levelno < logging.WARNING]


def test_push_to_hub_at_the_end_of_a_run(tmp_path, monkeypatch):
    """--train.push_to_hub uploads the final folder with its model card (HfApi mocked: no network)."""
    from pathlib import Path

    from huggingface_hub import HfApi

    cifar_dir("train")
    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("Url", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *, repo_id, folder_path, **kw: uploads.append(
        (repo_id, {p.name: p.read_bytes() for p in Path(folder_path).iterdir()})))
    train_script.train(load_config(SMOKE, ["--data.path", str(CIFAR10), "--train.output_dir", str(tmp_path),
                                           "--train.epochs", "1", "--train.push_to_hub", "someone/smoke-dynvit"]))
    ((repo_id, files),) = uploads
    assert repo_id == "someone/smoke-dynvit"
    assert sorted(files) == ["README.md", "config.json", "dynvit.safetensors", "eval.json", "model.safetensors",
                             "training_config.yaml"]
    assert files["model.safetensors"] == (tmp_path / "final" / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert 'dynvit.load_pretrained("hf-hub:someone/smoke-dynvit")' in card and "# Model card for someone/smoke-dynvit" in card
    assert "| dynvit | threshold, calibrated to 0.700/0.490 on 64 held-out training images |" in card
    assert "| dynvit | top-k, keep 0.700/0.490 |" in card and "| dynvit, dense path | no pruning |" in card
