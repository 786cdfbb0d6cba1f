"""Fine-tune a token-pruning ViT (or train a dense one) through Accelerate.

    python train.py --config configs/cifar10_dynvit.yaml [--section.key value ...]
    accelerate launch --mixed_precision bf16 --gradient_accumulation_steps 2 train.py --config ...

One function, :func:`train`, in the order of Accelerate's ``cv_example.py``: checks, accelerator,
seed, data, model, optimizer and scheduler, one ``prepare``, the loop with ``accumulate`` and
``backward``, validation with ``gather_for_metrics``, ``save_state``/``load_state``; then
threshold mode calibrated on held-out training images, the model saved (and pushed).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

import dynvit
from dynvit.benchmark import evaluate_modes, kept_token_stats, spread_indices
from dynvit.cli import ArgumentParser, HelpFormatter, add_config_arguments, config_overrides, user_errors
from dynvit.config import Config, ConfigError, load_config, save_config, to_dict
from dynvit.data import (DataError, SeededImageDataset, balanced_subset, build_datasets, build_transform, data_loader,
                         resolve_data, scan_image_folder)
from dynvit.losses import PruningLoss, classification_criterion
from dynvit.preflight import preflight
from dynvit.progress import progress
from dynvit.train_log import duration, evaluation_rows, step_line, validation_table
from dynvit.training import (DenseTrainingModel, MetricsFile, TrainState, calibration_indices, create_accelerator,
                             create_model, create_scheduler, create_teacher, find_checkpoint, param_groups,
                             save_checkpoint, seed_step, set_learning_rates)

logger = logging.getLogger("train")


def _hparams(cfg: Config) -> dict:
    """Flat scalar view of the config for the trackers' hyper-parameter tables."""
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _gmacs(model, images, modes, input_size) -> dict:
    if not hasattr(model, "prune_mode"):
        return {"gmacs_none": dynvit.count_flops(model, input_size)}
    return {f"gmacs_{m}": dynvit.count_flops(model, input_size, images=images, mode=m) for m in modes}


def _train_record(running: dict, count: int, accelerator, optimizer) -> dict:
    """Means over processes and the last ``count`` micro-batches of the summed loss terms (the
    one synchronisation of a logging interval), and the learning rate of each group."""
    names = list(running)
    means = accelerator.reduce(torch.stack([running[n] for n in names]).float(), "mean") / count
    record = {f"train/{n}": v for n, v in zip(names, means.tolist())}
    record.update({f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups})
    return record


def _accuracy(model, loader, accelerator, modes: list[str], bar: bool) -> dict:
    """Top-1 and top-5 per pruning mode (a model without predictors: the dense path only) and
    the kept tokens per stage and mode: mean, 5th and 95th percentile per image."""
    results = evaluate_modes(model, loader, modes if dynvit.is_patched(model) else ["none"], accelerator=accelerator,
                             progress_bar=bar)
    metrics = {f"{k}_{mode}": getattr(r, k) for mode, r in results.items() for k in ("top1", "top5")}
    for mode, result in results.items():
        for s, stats in enumerate(kept_token_stats(result.kept_tokens)):
            name = f"kept_tokens_{mode}_stage{s}"
            metrics.update({name: stats["mean"], f"{name}_p5": stats["p5"], f"{name}_p95": stats["p95"]})
    metrics["images"] = next(iter(results.values())).images
    return metrics


def _validate(model, ema, loader, accelerator, cfg: Config, flop_images, input_size, modes=None) -> dict:
    """Accuracy per pruning mode, kept tokens per stage, EMA accuracy and (main process) GMACs."""
    modes = modes or cfg.train.eval_modes
    bar = cfg.train.progress_bar and accelerator.is_main_process
    metrics = _accuracy(model, loader, accelerator, modes, bar)
    if ema is not None:
        ema_metrics = _accuracy(ema.module, loader, accelerator, modes[:1], bar)
        metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k != "images"})
    if accelerator.is_main_process and flop_images is not None:
        metrics.update(_gmacs(model, flop_images, modes, input_size))
    return metrics


def _fit_signals(model, teacher, train_folder, data_config, cfg: Config) -> None:
    """The signal weights chosen by search on training images (eval transform), before training."""
    indices = balanced_subset(train_folder.targets, cfg.model.fit_signals_images, cfg.train.seed + 1)
    images = SeededImageDataset(train_folder, build_transform(data_config, is_training=False), indices=indices)
    loader = torch.utils.data.DataLoader(images, batch_size=cfg.data.val_batch_size, num_workers=cfg.data.num_workers)
    start = time.time()
    history = dynvit.fit_signals(model, [x.to(model.keep_threshold.device) for x, _ in loader], teacher=teacher)
    chosen = {h["stage"]: h for h in history}
    logger.info("signal weights fitted on %d training images in %.0f s: %s", len(images), time.time() - start,
                "; ".join(f"stage {s}: " + ", ".join(f"{k} {v:g}" for k, v in h["weights"].items())
                          for s, h in sorted(chosen.items())))


def _calibrate(models, calib_set, cfg: Config, accelerator) -> str:
    """Threshold mode of every model calibrated to its keep ratio on the held-out images; the
    thresholds go into each model's ``keep_threshold`` (saved with it). Returns the setting."""
    loader = DataLoader(calib_set, batch_size=cfg.data.val_batch_size, num_workers=cfg.data.num_workers)
    batches = [images.to(accelerator.device) for images, _ in progress(
        loader, desc="calibration images", unit="batch", disable=not (cfg.train.progress_bar and accelerator.is_main_process))]
    for model in models:
        dynvit.calibrate(model, batches)
    ratios = "/".join(f"{r:.3f}" for r in models[0].keep_ratio)
    return f"threshold, calibrated to {ratios} on {len(calib_set)} held-out training images"


def train(cfg: Config) -> dict:
    """Run the configured training; return the last validation metrics (plus ``step``,
    ``output_dir`` and, when the run completed, ``final_dir``)."""
    launch = preflight(cfg)  # every user error, before anything is scanned or written
    for name in ("accelerate.checkpointing", "accelerate.accelerator"):  # 8 INFO lines per checkpoint; ours is one
        logging.getLogger(name).setLevel(logging.WARNING)
    out_dir = cfg.train.output_dir
    ckpt_root = os.path.join(out_dir, "checkpoints")
    accum = launch.grad_accum_steps
    accelerator = create_accelerator(cfg, launch)
    if launch.num_processes > accelerator.num_processes:
        # `accelerate launch --multi_gpu` on a machine without GPUs starts N processes, but Accelerate
        # sets up distributed CPU training (gloo) only when told to use the CPU; without that every
        # process would train alone and write the same files.
        raise ConfigError(f"launched as {launch.num_processes} processes but Accelerate runs {accelerator.num_processes}; "
                          "for several CPU processes set ACCELERATE_USE_CPU=1 (see README)")
    checkpoint = find_checkpoint(cfg.train.resume, ckpt_root)
    set_seed(cfg.train.seed)
    if accelerator.is_main_process:
        os.makedirs(ckpt_root, exist_ok=True)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))

    # Data: the folders fix the class count, the model fixes the preprocessing.
    micro_batch = cfg.data.batch_size // (accelerator.num_processes * accum)
    train_folder = scan_image_folder(os.path.join(cfg.data.path, cfg.data.train_split), what="training")
    val_folder = scan_image_folder(os.path.join(cfg.data.path, cfg.data.val_split), what="validation")
    classes = train_folder.classes

    # Model, teacher and data pipeline.
    model = create_model(cfg, num_classes=len(classes))
    pruning = hasattr(model, "forward_train")
    reducing = pruning or cfg.model.method != "dynvit"  # a baseline is distilled from the same teacher
    held_out = calibration_indices(train_folder.targets, cfg.train.calibrate_images, cfg.train.seed) if pruning else []
    data_config = resolve_data(model, cfg.data)
    train_set, val_set = build_datasets(cfg.data, cfg.aug, data_config, seed=cfg.train.seed, train_folder=train_folder,
                                        val_folder=val_folder, device=accelerator.device,  # data.cache: memory -> device
                                        exclude=held_out)
    calib_set = SeededImageDataset(train_folder, build_transform(data_config, is_training=False),
                                   indices=held_out) if held_out else None
    train_loader = data_loader(train_set, micro_batch, train=True, num_workers=cfg.data.num_workers)
    val_loader = data_loader(val_set, cfg.data.val_batch_size, train=False, num_workers=cfg.data.num_workers)
    mixup_on = cfg.aug.mixup_prob > 0 and (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0)
    mixup = Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mixup_prob,
                  switch_prob=cfg.aug.mixup_switch_prob, mode=cfg.aug.mixup_mode, label_smoothing=cfg.aug.smoothing,
                  num_classes=len(classes)) if mixup_on else None
    criterion = PruningLoss(
        classification_criterion(mixup=mixup_on, smoothing=cfg.aug.smoothing),
        model.keep_ratio if pruning else (),
        cls_weight=cfg.loss.cls_weight,
        ratio_weight=cfg.loss.ratio_weight,
        distill_logits_weight=cfg.loss.distill_logits_weight if reducing else 0.0,
        distill_tokens_weight=cfg.loss.distill_tokens_weight if pruning or cfg.model.method == "dense" else 0.0,
        ratio_per=cfg.loss.ratio_per,
        margin_weight=cfg.loss.margin_weight if pruning else 0.0,
        margin=cfg.loss.margin,
    )
    model.to(accelerator.device)
    # Frozen, never prepared; in bf16 when the student trains in bf16 (it runs under autocast anyway).
    teacher_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
    teacher = create_teacher(model, teacher_dtype) if criterion.needs_teacher else None
    if teacher is not None and not (cfg.model.pretrained or cfg.model.pretrained_path):
        logger.warning("the teacher is the randomly initialised starting model: distillation terms teach nothing")
    if pruning and cfg.model.fit_signals_images and checkpoint is None:  # a resumed run has its fitted weights
        _fit_signals(model, teacher, train_folder, data_config, cfg)
    training_model = (dynvit.TrainingModel(model, drop_tokens=cfg.model.drop_tokens) if pruning
                      else DenseTrainingModel(model))

    # Optimizer and schedules, all functions of the global step.
    steps_per_epoch = len(train_loader) // accelerator.num_processes // accum  # each process gets 1/n of the batches
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_set)} training images are fewer than one global batch of {cfg.data.batch_size}; "
                        "lower data.batch_size or use more images (data.train_subset)")
    total_steps = cfg.train.epochs * steps_per_epoch
    logger.info("%d process(es) on %s, mixed precision %s, gradient accumulation %d (%d images per micro-batch), "
                "%d steps per epoch, %d in all", accelerator.num_processes, accelerator.device, accelerator.mixed_precision,
                accelerator.gradient_accumulation_steps, micro_batch, steps_per_epoch, total_steps)
    optimizer = create_optimizer_v2(param_groups(model, cfg), opt=cfg.optim.opt, lr=cfg.optim.lr,
                                    weight_decay=cfg.optim.weight_decay,
                                    **({"eps": cfg.optim.eps} if "adam" in cfg.optim.opt else {}))
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
    freeze_steps = round(cfg.optim.backbone_freeze_epochs * steps_per_epoch) if pruning else 0
    anneal = cfg.tau.anneal_epochs
    tau_schedule = dynvit.TauSchedule(cfg.tau.kind, cfg.tau.tau_start, cfg.tau.tau_end,
                                      total_steps if anneal is None else round(anneal * steps_per_epoch))
    anneal = cfg.noise.anneal_epochs
    noise_schedule = dynvit.NoiseSchedule(cfg.noise.kind, cfg.noise.scale_start, cfg.noise.scale_end,
                                          total_steps if anneal is None else round(anneal * steps_per_epoch))

    training_model, optimizer, train_loader, val_loader = accelerator.prepare(
        training_model, optimizer, train_loader, val_loader)
    model = accelerator.unwrap_model(training_model).model
    assert len(train_loader) // accum == steps_per_epoch, (len(train_loader), accum, steps_per_epoch)
    ema = ModelEmaV3(model, decay=cfg.optim.ema_decay) if cfg.optim.ema else None
    state = TrainState()
    accelerator.register_for_checkpointing(state, scheduler, *([ema] if ema else []))
    if checkpoint:
        accelerator.load_state(checkpoint)
        logger.info("resumed from %s at step %d", checkpoint, state.step)
    accelerator.init_trackers("dynvit", config=_hparams(cfg))
    metrics_file = MetricsFile(os.path.join(out_dir, "metrics.jsonl"), accelerator.is_main_process)

    # The loop: one bar over the whole run, a line every log_every steps.
    step, metrics, stopped = state.step, {}, False
    running, seen_steps, start = {}, 0, time.time()
    first_step, last_log = step, start
    flop_ix = spread_indices(len(val_set), cfg.train.flops_images)  # every class, the same images every epoch
    flop_images = torch.stack([val_set[i][0] for i in flop_ix]).to(accelerator.device) if flop_ix else None
    bar = progress(desc="training", total=total_steps, initial=step, unit="step", leave=True,
                   disable=not (accelerator.is_main_process and cfg.train.progress_bar))
    with logging_redirect_tqdm():
        for epoch in range(step // steps_per_epoch, cfg.train.epochs):
            training_model.train()
            train_set.set_epoch(epoch)
            done = (step - epoch * steps_per_epoch) * accum  # micro-batches of this epoch already trained on
            loader = accelerator.skip_first_batches(train_loader, done) if done else train_loader
            loader.set_epoch(epoch)
            bar.set_description(f"epoch {epoch}")
            for micro, (images, target) in enumerate(loader, start=done):
                if micro >= steps_per_epoch * accum:
                    continue  # the tail that does not fill an optimizer step
                seed_step(cfg.train.seed, step, micro % accum, accelerator.process_index)
                with accelerator.accumulate(training_model):
                    set_learning_rates(optimizer, scheduler, step, freeze_steps)
                    tau, noise_scale = tau_schedule(step), noise_schedule(step)
                    if mixup is not None:
                        images, target = mixup(images, target)
                    with accelerator.autocast():
                        out = training_model(images, tau, noise_scale=noise_scale)
                        t_logits = t_tokens = None
                        if teacher is not None:
                            with torch.inference_mode():  # one forward per batch, no autograd bookkeeping
                                t_tokens = teacher.forward_features(images)
                                t_logits = teacher.forward_head(t_tokens)
                        terms = criterion(out, target, t_logits, t_tokens, model.num_prefix_tokens, noise_scale)
                    accelerator.backward(terms.total)
                    if accelerator.sync_gradients and cfg.optim.clip_grad:
                        accelerator.clip_grad_norm_(training_model.parameters(), cfg.optim.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad()
                for name, value in terms.as_dict().items():
                    running[name] = running.get(name, 0.0) + value.detach()
                for s, m in enumerate(out.keep_masks):
                    running[f"kept_frac_stage{s}"] = running.get(f"kept_frac_stage{s}", 0.0) + m.detach().float().mean()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                state.step = step
                seen_steps += 1
                bar.update(1)
                if ema is not None:
                    ema.update(model, step=step)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    now = time.time()
                    record = _train_record(running, seen_steps * accum, accelerator, optimizer)
                    record.update({"train/tau": tau, "train/noise_scale": noise_scale, "epoch": epoch,
                                   "time": round(now - start, 1)})
                    accelerator.log(record, step=step)
                    metrics_file.write({"step": step, **record})
                    bar.set_postfix(loss=f"{record['train/total']:.4f}")
                    eta = (now - start) / (step - first_step) * (total_steps - step)
                    logger.info(step_line(record, step=step, total_steps=total_steps, epoch=epoch,
                                          images_per_s=seen_steps * cfg.data.batch_size / max(now - last_log, 1e-9),
                                          eta_s=eta))
                    running, seen_steps, last_log = {}, 0, now
                if step == cfg.train.stop_after_steps:
                    stopped = True
                    break
                if cfg.train.save_every_steps and step % cfg.train.save_every_steps == 0 and step % steps_per_epoch:
                    save_checkpoint(accelerator, ckpt_root, step, cfg, cfg.train.keep_checkpoints)
            epoch_done = step % steps_per_epoch == 0
            if epoch_done and ((epoch + 1) % cfg.train.eval_every_epochs == 0 or epoch + 1 == cfg.train.epochs):
                metrics = _validate(model, ema, val_loader, accelerator, cfg, flop_images, data_config["input_size"])
                accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
                metrics_file.write({"step": step, "epoch": epoch, "time": round(time.time() - start, 1),
                                    **{f"val/{k}": v for k, v in metrics.items()}})
                logger.info(validation_table(metrics, f"validation after epoch {epoch} (step {step}, "
                                                      f"{metrics['images']} images, {duration(time.time() - start)}):"))
            save_checkpoint(accelerator, ckpt_root, step, cfg, cfg.train.keep_checkpoints)
            if stopped:
                break
    bar.close()

    result = {**metrics, "step": step, "output_dir": out_dir}
    if not stopped:
        result.update(_finish(cfg, model, ema, calib_set, val_loader, accelerator, metrics, flop_images, data_config,
                              classes, metrics_file, step))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _finish(cfg, model, ema, calib_set, val_loader, accelerator, metrics, flop_images, data_config, classes, metrics_file,
            step) -> dict:
    """After the last step: threshold mode calibrated and measured again, the model (and EMA)
    saved with its model card, pushed to the Hub when asked."""
    settings, result = {"none": "-"}, {}
    method = "dynvit" if dynvit.is_patched(model) else (cfg.model.method if cfg.model.method != "dynvit" else "dense")
    if method == "dynvit":
        ratios = "/".join(f"{r:.3f}" for r in model.keep_ratio)
        settings = {"none": "no pruning", "topk": f"top-k, keep {ratios}", "threshold": "threshold as trained (p > 0.5)"}
    if calib_set is not None and metrics:
        settings["threshold"] = _calibrate([model] + ([ema.module] if ema else []), calib_set, cfg, accelerator)
        after = _validate(model, None, val_loader, accelerator, cfg, flop_images, data_config["input_size"], ["threshold"])
        metrics = {**metrics, **after}  # the saved model's figures
        result = {**{f"calibrated_{k}": v for k, v in after.items()}, "thresholds": model.keep_threshold.tolist()}
        metrics_file.write({"step": step, **{f"val/calibrated_{k}": v for k, v in after.items()}})
        n0 = model.patch_embed.num_patches
        kept = [after[f"kept_tokens_threshold_stage{s}"] / n0 for s in range(len(model.prune_loc))]
        logger.info("threshold mode calibrated on %d held-out training images (thresholds %s): keeps %s of the patch "
                    "tokens on the %d validation images (targets %s), top-1 %.2f", len(calib_set),
                    "/".join(f"{t:.3f}" for t in model.keep_threshold.tolist()), "/".join(f"{k:.3f}" for k in kept),
                    after["images"], "/".join(f"{r:.3f}" for r in model.keep_ratio), after["top1_threshold"])
    if accelerator.is_main_process:
        evaluation = {"data": os.path.join(cfg.data.path, cfg.data.val_split), "images": metrics.get("images"),
                      "source": "train.py validation", "rows": evaluation_rows(metrics, method=method, settings=settings)}
        final = {"classes": classes, "data_config": data_config, "evaluation": evaluation, "training_config": to_dict(cfg)}
        result["final_dir"] = dynvit.save_pretrained(model, os.path.join(cfg.train.output_dir, "final"), **final)
        if ema is not None:
            dynvit.save_pretrained(ema.module, os.path.join(cfg.train.output_dir, "final_ema"), **final)
        if cfg.train.push_to_hub:
            dynvit.push_to_hub(result["final_dir"], cfg.train.push_to_hub)
            logger.info("pushed %s to https://huggingface.co/%s", result["final_dir"], cfg.train.push_to_hub)
    return result


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    parser = ArgumentParser(
        prog="train.py",
        description=doc[0] + "\n\n" + doc[1], formatter_class=HelpFormatter, allow_abbrev=False,
        usage="%(prog)s [-h] [--config YAML] [--resume [PATH]] [--section.key VALUE ...]",
        epilog="Every key below can be set in the YAML file (section: key: value) or here; later wins. A mapping takes "
               "one entry at a time too: --model.kwargs.depth 6. null unsets a key (YAML null).")
    parser.add_argument("--config", metavar="YAML", help="preset to start from (see configs/); flags override it")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                        help="resume from the latest checkpoint of train.output_dir, or from PATH")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = config_overrides(args) + rest
    if args.resume is not None:
        overrides += ["--train.resume", args.resume]
    main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with user_errors(parser):
        return train(load_config(args.config, overrides))


if __name__ == "__main__":
    main(sys.argv[1:])
