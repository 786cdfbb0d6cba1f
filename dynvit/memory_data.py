"""``data.cache: memory``: an ImageFolder split decoded once into a uint8 tensor on the device
that trains; batches come out of it augmented (training) or normalised (evaluation) there.

- **Decoding** (:func:`decode_split`): libjpeg-turbo through ``torchvision.io.decode_image``
  on a few threads (PIL for formats it does not read). Images that are not the input size are
  resized once: for training the whole image (its aspect ratio is kept, so that crops cover
  the original pixels' proportions), for evaluation by timm's own resize and centre crop.
  With a ``cache_dir`` the decoded split is stored as safetensors, keyed by the folder, the
  name, size and mtime of every file, and the geometry.
- **Training batches** (:class:`MemoryImageDataset`): the random-resized crop and flip of each
  image are drawn per epoch from ``(seed, epoch)`` for the whole dataset, so an image's crop
  does not depend on the batch it lands in, the number of processes or a resume; a batch is
  cropped in one ``grid_sample``, normalised, then erased by timm's ``RandomErasing`` (seeded
  from the seed, the epoch and the batch's first index, never from a call count).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import PIL
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.functional import pil_to_tensor

from .batch_aug import RESAMPLE_MODES, crop_flip, normalize, sample_crops
from .config import ConfigError
from .data import DataError, _sample_seed

__all__ = ["DecodedSplit", "decode_split", "TrainAugment", "MemoryImageDataset", "memory_datasets"]

_log = logging.getLogger(__name__)
_CACHE_VERSION = 1


@dataclass
class DecodedSplit:
    """Images of a split at the model's input size, with their labels."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    targets: torch.Tensor  # (N,) int64 class indices
    aspect: torch.Tensor  # (N,) float32 width / height of each original image


@dataclass(frozen=True)
class TrainAugment:
    """The training augmentation a :class:`MemoryImageDataset` applies to its batches."""

    scale: tuple[float, float]  # random-resized-crop area range
    hflip: float  # horizontal flip probability
    re_prob: float  # random erasing probability (timm, pixel mode, one box)
    mode: str  # resampling of the crops: bilinear, bicubic or nearest


# ---- decoding -------------------------------------------------------------------------------
def _read_rgb(path: str) -> torch.Tensor:
    """``(3, h, w)`` uint8 pixels of an image file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read image {path!r}: {e}") from e
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):  # a format torchvision does not decode: PIL's turn
        pass
    try:
        with Image.open(io.BytesIO(data)) as image:
            return pil_to_tensor(image.convert("RGB"))
    except OSError as e:
        raise DataError(f"cannot read image {path!r}: {e}") from e


def _resizer(train: bool, size: tuple[int, int], data_config: dict):
    """``(convert, key)``: ``convert`` brings a decoded ``(3, h, w)`` uint8 image to the input
    ``size`` (an image that has it already is returned as it is, unless evaluation's crop_pct
    rescales it); ``key`` is what the result depends on, for the disk cache."""
    height, width = size
    interpolation = data_config["interpolation"]
    if train:  # the whole image; the crops are drawn from it per epoch
        def transform(image):
            return pil_to_tensor(image.resize((width, height), resample=str_to_pil_interp(interpolation)))
        unscaled, key = True, {"interpolation": interpolation}
    else:  # timm's own evaluation resize and centre crop, without ToTensor and Normalize
        crop_pct, crop_mode = data_config.get("crop_pct"), data_config.get("crop_mode")
        transform = create_transform(input_size=(3, height, width), is_training=False, interpolation=interpolation,
                                     crop_pct=crop_pct, crop_mode=crop_mode, normalize=False)
        unscaled = all(math.floor(s / (crop_pct or 0.875)) == s for s in size)  # 0.875: timm's default crop_pct
        key = {"interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": crop_mode}

    def convert(image: torch.Tensor) -> torch.Tensor:
        if unscaled and tuple(image.shape[1:]) == size:
            return image
        return transform(Image.fromarray(image.permute(1, 2, 0).numpy()))

    return convert, key


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux: MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(n: int, size: tuple[int, int]) -> None:
    need, free = n * 3 * size[0] * size[1], _available_memory()
    if free is not None and need > 0.8 * free:
        raise DataError(f"data.cache: memory would hold {n} images of 3x{size[0]}x{size[1]} ({need / 2**30:.1f} GiB) "
                        f"with {free / 2**30:.1f} GiB of memory available; use data.cache: none (or data.train_subset)")


def _cache_path(cache_dir: str, root: str, samples: list, size, train: bool, key: dict) -> str:
    digest = hashlib.sha256(json.dumps({"version": _CACHE_VERSION, "root": os.path.realpath(root), "size": list(size),
                                        "train": train, "geometry": key, "torchvision": torchvision.__version__,
                                        "pillow": PIL.__version__}, sort_keys=True).encode())
    for path, target in samples:
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}\0{target}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    parent, split = os.path.split(os.path.normpath(os.path.realpath(root)))
    name = f"{os.path.basename(parent)}-{split}-{'train' if train else 'eval'}-{size[0]}x{size[1]}-{len(samples)}"
    return os.path.join(cache_dir, f"{name}-{digest.hexdigest()[:16]}.safetensors")


def decode_split(folder, indices: Sequence[int] | None, *, size: Sequence[int], train: bool, data_config: dict,
                 cache_dir: str | None = None, threads: int | None = None) -> DecodedSplit:
    """Decode the images ``indices`` of an ``ImageFolder`` once, at the input ``size``.

    Args:
        folder: a scanned ``ImageFolder`` (:func:`dynvit.data.scan_image_folder`).
        indices: the images to keep (e.g. :func:`dynvit.data.balanced_subset`); None = all.
        size: ``(H, W)`` of the model's input.
        train: True: other sizes are resized whole (training crops come later); False:
            timm's evaluation resize and centre crop (``data_config``'s ``crop_pct``).
        data_config: timm data config (``interpolation``, ``crop_pct``, ``crop_mode``).
        cache_dir: where to keep the decoded split for later runs; None = no disk cache.
        threads: decoding threads; None = up to 4.
    """
    size = (int(size[0]), int(size[1]))
    samples = [folder.samples[i] for i in indices] if indices is not None else list(folder.samples)
    convert, key = _resizer(train, size, data_config)
    path = _cache_path(cache_dir, folder.root, samples, size, train, key) if cache_dir else None
    if path and os.path.isfile(path):
        try:
            tensors = load_file(path)
            _log.info("loaded %d decoded images from %s", len(samples), path)
            return DecodedSplit(tensors["images"], tensors["targets"], tensors["aspect"])
        except Exception as e:  # noqa: BLE001 (safetensors' own error class) a damaged file is decoded again
            _log.warning("ignoring the unreadable decoded cache %s: %s", path, e)
    _check_memory(len(samples), size)
    start = time.perf_counter()
    images = torch.empty(len(samples), 3, *size, dtype=torch.uint8)
    aspect = torch.empty(len(samples))

    def decode(i: int) -> None:
        image = _read_rgb(samples[i][0])
        aspect[i] = image.shape[2] / image.shape[1]
        images[i] = convert(image)

    with ThreadPoolExecutor(threads or min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(samples)), chunksize=256))
    split = DecodedSplit(images, torch.tensor([t for _, t in samples], dtype=torch.int64), aspect)
    _log.info("decoded %d images of %s in %.1f s", len(samples), folder.root, time.perf_counter() - start)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file({"images": split.images, "targets": split.targets, "aspect": split.aspect}, tmp)
        os.replace(tmp, path)  # other processes see the whole file or none
    return split


# ---- batches ----------------------------------------------------------------------------------
class MemoryImageDataset(Dataset):
    """A decoded split on ``device`` that makes whole batches: ``__getitems__(indices)``
    returns ``(images, targets)`` on the device, augmented when ``augment`` is set.

    ``dynvit.data.data_loader`` reads it in the loading process and passes its batches on
    as they are; ``dataset[i]`` gives one ``(image, target)``.

    Args:
        split: the decoded images, targets and original aspect ratios.
        classes: class names, in target order.
        mean, std: per-channel normalisation of [0, 1] pixels.
        device: where the images live and batches are made (``accelerator.device``).
        augment: training augmentation; None = evaluation (normalisation only).
        seed: base seed of the augmentation.
    """

    def __init__(self, split: DecodedSplit, classes: Sequence[str], *, mean: Sequence[float], std: Sequence[float],
                 device: str | torch.device = "cpu", augment: TrainAugment | None = None, seed: int = 0):
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.targets = split.targets.to(self.device)
        self.aspect = split.aspect
        self.classes = list(classes)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        if augment is not None and augment.mode not in RESAMPLE_MODES:
            raise ValueError(f"augment.mode must be one of {RESAMPLE_MODES}, got {augment.mode!r}")
        self.augment = augment
        self.erasing = (RandomErasing(augment.re_prob, mode="pixel", max_count=1, device=self.device)
                        if augment is not None and augment.re_prob > 0 else None)
        self.seed = seed
        self.epoch = 0
        self._crops: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (epoch, boxes, flips) on the device

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def crops(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's crop boxes and flips of every image (a function of seed and epoch)."""
        if self._crops is None or self._crops[0] != self.epoch:
            generator = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, 1))
            boxes, flips = sample_crops(len(self), self.augment.scale, hflip=self.augment.hflip, aspect=self.aspect,
                                        generator=generator)
            self._crops = (self.epoch, boxes.to(self.device), flips.to(self.device))
        return self._crops[1], self._crops[2]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long).to(self.device)
        images = self.images[index].float().div_(255)
        if self.augment is not None:
            boxes, flips = self.crops()
            images = crop_flip(images, boxes[index], flips[index], mode=self.augment.mode).clamp_(0, 1)
        images = normalize(images, self.mean, self.std)
        if self.erasing is not None:
            self._erase(images, int(indices[0]))
        return images, self.targets[index]

    def _erase(self, images: torch.Tensor, first: int) -> None:
        """timm's RandomErasing, with Python's and torch's generators seeded for this batch
        and restored afterwards (the training step's own randomness stays untouched)."""
        seed = _sample_seed(self.seed, self.epoch, first, 2)
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        state = random.getstate()
        with torch.random.fork_rng(devices=cuda):
            random.seed(seed)
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(seed)
            self.erasing(images)
        random.setstate(state)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, targets = self.__getitems__([index])
        return images[0], int(targets[0])


def memory_datasets(train_folder, train_indices, val_folder, val_indices, aug_cfg, data_config: dict, *, seed: int,
                    device: str | torch.device = "cpu", cache_dir: str | None = None):
    """Training and validation :class:`MemoryImageDataset` (see :func:`dynvit.data.build_datasets`)."""
    interpolation = data_config["interpolation"]
    if interpolation not in RESAMPLE_MODES:
        raise ConfigError(f"interpolation {interpolation!r} has no batched equivalent under data.cache: memory; "
                          f"set data.interpolation to one of {RESAMPLE_MODES}")
    size = tuple(data_config["input_size"][-2:])
    common = dict(mean=data_config["mean"], std=data_config["std"], device=device, seed=seed)
    augment = TrainAugment(tuple(aug_cfg.scale), aug_cfg.hflip, aug_cfg.re_prob, interpolation)
    train = MemoryImageDataset(decode_split(train_folder, train_indices, size=size, train=True, data_config=data_config,
                                            cache_dir=cache_dir), train_folder.classes, augment=augment, **common)
    val = MemoryImageDataset(decode_split(val_folder, val_indices, size=size, train=False, data_config=data_config,
                                          cache_dir=cache_dir), val_folder.classes, **common)
    return train, val
