"""ImageFolder datasets with timm transforms, seeded subsets and reproducible augmentation.

Augmentation of sample ``i`` in epoch ``e`` is a pure function of ``(seed, e, i)``: the
random state is set per sample, so the same image gets the same crop whether a run was
interrupted or not, and whatever the number of loader workers or training processes.
``data.cache: memory`` swaps these datasets for the decoded-once ones of
:mod:`dynvit.memory_data`, whose batches are augmented on the training device.
"""
from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from .progress import progress

__all__ = ["DataError", "scan_image_folder", "SeededImageDataset", "resolve_data", "build_transform", "build_datasets",
           "balanced_subset", "data_loader", "verify_images"]

_log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset folder that is missing, empty or unreadable, or classes that do not match."""


def scan_image_folder(path: str | os.PathLike, *, what: str = "dataset") -> ImageFolder:
    """An ``ImageFolder`` (no transform) over ``path``, with errors that say what is wrong."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{what} folder {path!r} does not exist; expected one sub-folder of images per class")
    if not os.path.isdir(path):
        raise DataError(f"{what} path {path!r} is not a folder")
    try:
        class_dirs = [e for e in os.scandir(path) if e.is_dir()]
    except OSError as e:
        raise DataError(f"cannot read {what} folder {path!r}: {e}") from e
    if not class_dirs:
        raise DataError(f"{what} folder {path!r} has no class sub-folders; expected <folder>/<class>/<image> (ImageFolder layout)")
    try:
        folder = ImageFolder(path)
    except FileNotFoundError as e:  # raised by torchvision for class folders without images
        raise DataError(f"{what} folder {path!r}: {e} (image extensions: {', '.join(IMG_EXTENSIONS)})") from e
    except OSError as e:
        raise DataError(f"cannot read {what} folder {path!r}: {e}") from e
    _log.info("%s: %d images in %d classes from %s", what, len(folder), len(folder.classes), path)
    return folder


def balanced_subset(targets: Sequence[int], size: int, seed: int) -> list[int]:
    """``size`` indices drawn round-robin over the classes, in a seeded random order per class."""
    if size <= 0 or size >= len(targets):
        return list(range(len(targets)))
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    queues = [list(rng.permutation(ix)) for _, ix in sorted(by_class.items())]
    picked: list[int] = []
    while len(picked) < size:
        for q in queues:
            if q and len(picked) < size:
                picked.append(int(q.pop()))
    return sorted(picked)


def _sample_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class SeededImageDataset(Dataset):
    """Images of an ``ImageFolder`` (optionally a subset) through ``transform``, with the
    random state of the transform fixed per ``(seed, epoch, index)``.

    Args:
        folder: the scanned folder (its own transform is ignored).
        transform: image transform (a timm/torchvision transform).
        indices: subset of the folder to use; None = all.
        seed: base seed of the augmentation.
    """

    def __init__(self, folder: ImageFolder, transform, *, indices: Sequence[int] | None = None, seed: int = 0):
        self.samples = [folder.samples[i] for i in indices] if indices is not None else list(folder.samples)
        self.classes = list(folder.classes)
        self.transform = transform
        self.loader = folder.loader
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # read by workers started after this call (workers are not persistent)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except OSError as e:
            raise DataError(f"cannot read image {path!r}: {_reason(e)}; remove or replace it (data.verify: true lists every "
                            "unreadable image before training)") from e
        seed = _sample_seed(self.seed, self.epoch, index)
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed)
            image = self.transform(image)
        random.setstate(state)
        return image, target


def resolve_data(model: torch.nn.Module, data_cfg) -> dict:
    """timm's data config for ``model`` (input size, interpolation, mean, std, crop) with the
    values set in ``data_cfg`` (a :class:`dynvit.config.DataConfig`) taking precedence."""
    overrides = {}
    if data_cfg.input_size is not None:
        overrides["input_size"] = (3, data_cfg.input_size, data_cfg.input_size)
    for key in ("interpolation", "crop_pct", "mean", "std"):
        value = getattr(data_cfg, key)
        if value is not None:
            overrides[key] = tuple(value) if isinstance(value, list) else value
    return resolve_data_config(overrides, model=model)


def build_transform(data_config: dict, aug_cfg=None, *, is_training: bool):
    """timm ``create_transform`` for training (with the augmentation of ``aug_cfg``, a
    :class:`dynvit.config.AugConfig`) or evaluation."""
    common = dict(
        input_size=data_config["input_size"],
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
    )
    if not is_training:
        return create_transform(**common, is_training=False, crop_pct=data_config.get("crop_pct"),
                                crop_mode=data_config.get("crop_mode"))
    return create_transform(
        **common,
        is_training=True,
        scale=tuple(aug_cfg.scale),
        hflip=aug_cfg.hflip,
        color_jitter=aug_cfg.color_jitter if aug_cfg.color_jitter else None,
        auto_augment=aug_cfg.auto_augment,
        re_prob=aug_cfg.re_prob,
        re_mode="pixel",
        re_count=1,
    )


def build_datasets(data_cfg, aug_cfg, data_config: dict, *, seed: int, train_folder=None, val_folder=None,
                   device: str | torch.device = "cpu", exclude: Sequence[int] = ()):
    """Training and validation datasets for the config: :class:`SeededImageDataset` (images
    decoded and augmented per sample, in loader workers) or, with ``data_cfg.cache ==
    "memory"``, :class:`dynvit.memory_data.MemoryImageDataset` on ``device``.

    Folders may be passed in when they were scanned already (to learn the class count);
    ``exclude`` lists training images kept out of training (held out for calibration), which
    ``data_cfg.verify`` checks as well.
    """
    train_folder = train_folder or scan_image_folder(os.path.join(data_cfg.path, data_cfg.train_split), what="training")
    val_folder = val_folder or scan_image_folder(os.path.join(data_cfg.path, data_cfg.val_split), what="validation")
    if train_folder.classes != val_folder.classes:
        only_train = sorted(set(train_folder.classes) - set(val_folder.classes))
        only_val = sorted(set(val_folder.classes) - set(train_folder.classes))
        raise DataError(
            f"training and validation classes differ: only in training {only_train[:10]}, only in validation {only_val[:10]}"
        )
    excluded = set(exclude)
    pool = [i for i in range(len(train_folder)) if i not in excluded]
    train_ix = [pool[j] for j in balanced_subset([train_folder.targets[i] for i in pool], data_cfg.train_subset, seed)]
    val_ix = balanced_subset(val_folder.targets, data_cfg.val_subset, seed)
    if data_cfg.verify:
        verify_images([train_folder.samples[i][0] for i in sorted({*train_ix, *excluded})]
                      + [val_folder.samples[i][0] for i in val_ix], num_workers=data_cfg.num_workers)
    if data_cfg.cache == "memory":
        from .memory_data import memory_datasets  # imported here: memory_data builds on this module

        return memory_datasets(train_folder, train_ix, val_folder, val_ix, aug_cfg, data_config, seed=seed, device=device,
                               cache_dir=data_cfg.cache_dir)
    train = SeededImageDataset(train_folder, build_transform(data_config, aug_cfg, is_training=True), indices=train_ix, seed=seed)
    val = SeededImageDataset(val_folder, build_transform(data_config, is_training=False), indices=val_ix, seed=seed)
    return train, val


def _reason(error: Exception) -> str:
    return re.sub(r"<_io\.\w+ name=('[^']*')>", r"\1", str(error))  # PIL names the open file object


def _unreadable(path: str) -> str | None:
    try:
        default_loader(path)
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file cannot be trained on
        return f"{path} ({type(e).__name__}: {_reason(e)})"
    return None


def verify_images(paths: Sequence[str], *, num_workers: int = 0) -> None:
    """Decode every image of ``paths`` as training will (``num_workers`` threads, with a
    progress bar) and raise one :class:`DataError` that lists every file that fails."""
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        results = progress(pool.map(_unreadable, paths), desc="verifying images", total=len(paths), unit="img")
        bad = [r for r in results if r]
    if bad:
        raise DataError(f"{len(bad)} of {len(paths)} images cannot be read: {'; '.join(bad)}; remove or replace them, "
                        "then run again")
    _log.info("verified %d images: all readable", len(paths))


def _whole_batch(batch):
    return batch


def data_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int = 0) -> DataLoader:
    """The loader of a training (shuffled, full batches only) or evaluation dataset.

    A dataset that makes whole batches itself (``__getitems__``, as the in-memory one does on
    its device) is read in this process and its batches are passed on as they are.
    """
    if hasattr(dataset, "__getitems__"):
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train, collate_fn=_whole_batch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=num_workers,
                      pin_memory=train and torch.cuda.is_available())
