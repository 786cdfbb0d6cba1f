"""data.cache: memory. Evaluation batches equal timm's evaluation transform; the batched crop
draws what torchvision's RandomResizedCrop draws and puts it where it says; batches depend on
(seed, epoch, image) only; bad options and folders are named."""
from __future__ import annotations

import math
import random

import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

import dynvit.memory_data as memory_data
from conftest import CIFAR10, REPO, cifar_dir
from dynvit.batch_aug import crop_flip, normalize, sample_crops
from dynvit.config import ConfigError, load_config
from dynvit.data import DataError, SeededImageDataset, build_datasets, build_transform, scan_image_folder
from dynvit.memory_data import MemoryImageDataset, TrainAugment, decode_split

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def data_config(size=32, crop_pct=1.0, interpolation="bicubic"):
    return {"input_size": (3, size, size), "interpolation": interpolation, "mean": MEAN, "std": STD,
            "crop_pct": crop_pct, "crop_mode": None}


def train_set(folder, indices, *, scale=(0.08, 1.0), hflip=0.5, re_prob=0.0, mode="bilinear", seed=0):
    split = decode_split(folder, indices, size=(32, 32), train=True, data_config=data_config())
    return MemoryImageDataset(split, folder.classes, mean=MEAN, std=STD, seed=seed,
                              augment=TrainAugment(tuple(scale), hflip, re_prob, mode))


@pytest.fixture(scope="module")
def cifar_test():
    return scan_image_folder(cifar_dir("test"))


@pytest.fixture(scope="module")
def odd_sizes(tmp_path_factory):
    """An ImageFolder of PNGs that are not square: 48x24 and 20x36 (width x height)."""
    root = tmp_path_factory.mktemp("odd")
    g = torch.Generator().manual_seed(0)
    for c, (w, h) in enumerate([(48, 24), (20, 36)]):
        (root / f"c{c}").mkdir()
        for i in range(3):
            pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return scan_image_folder(root)


# ---- evaluation batches -----------------------------------------------------------------------
@pytest.mark.parametrize("size, crop_pct", [(32, 1.0), (32, 0.875), (40, 0.875)])  # as stored; via 36 or 45, cropped
def test_eval_batches_equal_timm_eval_transform(cifar_test, size, crop_pct):
    """Same pixels as PIL + timm's resize/center crop + ToTensor + Normalize: the decoder is
    libjpeg-turbo in both, the geometry is timm's own transform, so only float rounding may
    differ (1e-6)."""
    config = data_config(size, crop_pct)
    indices = list(range(0, 10000, 250))
    reference = SeededImageDataset(cifar_test, build_transform(config, is_training=False), indices=indices)
    expected = torch.stack([reference[i][0] for i in range(len(indices))])
    split = decode_split(cifar_test, indices, size=(size, size), train=False, data_config=config)
    ds = MemoryImageDataset(split, cifar_test.classes, mean=MEAN, std=STD)
    images, targets = ds.__getitems__(list(range(len(indices))))
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    assert targets.tolist() == [reference.samples[i][1] for i in range(len(indices))]


def test_odd_sizes_eval_is_timm_and_train_keeps_the_aspect(odd_sizes):
    config = data_config(16, 0.875)
    reference = SeededImageDataset(odd_sizes, build_transform(config, is_training=False))
    split = decode_split(odd_sizes, None, size=(16, 16), train=False, data_config=config)
    ds = MemoryImageDataset(split, odd_sizes.classes, mean=MEAN, std=STD)
    torch.testing.assert_close(ds.__getitems__(list(range(6)))[0], torch.stack([reference[i][0] for i in range(6)]),
                               rtol=0, atol=1e-6)
    train = decode_split(odd_sizes, None, size=(16, 16), train=True, data_config=config)
    assert train.images.shape == (6, 3, 16, 16) and train.images.dtype == torch.uint8
    torch.testing.assert_close(train.aspect, torch.tensor([2.0] * 3 + [20 / 36] * 3))


# ---- the batched crop -------------------------------------------------------------------------
def test_full_crop_without_flip_is_the_identity(cifar_test):
    indices = list(range(0, 10000, 500))
    for mode in ("bilinear", "bicubic"):
        ds = train_set(cifar_test, indices, scale=(1.0, 1.0), hflip=0.0, mode=mode)
        boxes, flips = ds.crops()
        assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(indices), 4)) and not flips.any()
        images, _ = ds.__getitems__(list(range(len(indices))))
        plain = normalize(ds.images.float().div(255), ds.mean, ds.std)
        torch.testing.assert_close(images, plain, rtol=0, atol=2e-5)


def test_flip_flag_flips_and_boxes_land_where_they_say():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    out = crop_flip(images, full, torch.tensor([True, False, True]))
    torch.testing.assert_close(out[[0, 2]], images[[0, 2]].flip(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], images[1], rtol=0, atol=1e-6)
    # the centre quarter (pixels 2..5), doubled by nearest resampling; then its mirror image
    box = torch.tensor([[0.25, 0.25, 0.5, 0.5]])
    twice = images[:1, :, 2:6, 2:6].repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    assert torch.equal(crop_flip(images[:1], box, torch.tensor([False]), mode="nearest"), twice)
    assert torch.equal(crop_flip(images[:1], box, torch.tensor([True]), mode="nearest"), twice.flip(-1))
    # a box in the top-left corner, output at the box's own size: its pixels
    corner = crop_flip(images, torch.tensor([[0.0, 0.0, 0.5, 0.25]] * 3), torch.zeros(3, dtype=torch.bool), (2, 4))
    torch.testing.assert_close(corner, images[:, :, :2, :4], rtol=0, atol=1e-6)


@pytest.mark.parametrize("aspect", [1.0, 2.0])
def test_crops_stay_inside_and_follow_torchvision(aspect):
    """Boxes stay in the image; the area fraction and the crop's ratio (in the original image's
    pixels) stay in range; their distribution is torchvision's RandomResizedCrop's."""
    n, scale = 20000, (0.08, 1.0)
    boxes, flips = sample_crops(n, scale, hflip=0.3, aspect=torch.full((n,), aspect),
                                generator=torch.Generator().manual_seed(0))
    left, top, w, h = boxes.unbind(1)
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= 1 + 1e-6).all() and (top + h <= 1 + 1e-6).all()
    area, ratio = w * h, w * aspect / h
    assert (area >= scale[0] - 1e-6).all() and (area <= 1 + 1e-6).all()
    assert (ratio >= 3 / 4 - 1e-5).all() and (ratio <= 4 / 3 + 1e-5).all()
    assert abs(float(flips.float().mean()) - 0.3) < 0.015
    # torchvision on a large image of the same shape (whole-pixel rounding is negligible there)
    width, height = round(1200 * aspect), 1200
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), [3 / 4, 4 / 3])
                        for _ in range(5000)], dtype=torch.float64)  # (top, left, h, w) in pixels
    ref_w, ref_h = ref[:, 3] / width, ref[:, 2] / height
    for ours, theirs in ((area, ref_w * ref_h), (w, ref_w), (h, ref_h), (left + w / 2, (ref[:, 1] / width) + ref_w / 2)):
        assert abs(float(ours.mean()) - float(theirs.mean())) < 0.015
        assert abs(float(ours.std()) - float(theirs.std())) < 0.015


# ---- determinism --------------------------------------------------------------------------------
def test_a_batch_depends_on_seed_epoch_and_image_only(cifar_test):
    indices = list(range(0, 10000, 400))
    a, b = train_set(cifar_test, indices, re_prob=0.5), train_set(cifar_test, indices, re_prob=0.5)
    batch = [3, 7, 1, 12]
    for ds in (a, b):
        ds.set_epoch(2)
    torch.testing.assert_close(a.__getitems__(batch), b.__getitems__(batch), rtol=0, atol=0)
    state = (random.getstate(), torch.get_rng_state())
    x, _ = a.__getitems__(batch)
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])  # the step's RNGs untouched
    b.set_epoch(3)
    assert not torch.allclose(x, b.__getitems__(batch)[0])
    c = train_set(cifar_test, indices, seed=1)
    c.set_epoch(2)
    assert not torch.allclose(train_set(cifar_test, indices).crops()[0], c.crops()[0])
    # without erasing, an image's crop is its own, whatever batch it comes in
    plain = train_set(cifar_test, indices)
    plain.set_epoch(2)
    torch.testing.assert_close(plain.__getitems__([5, 9])[0][1], plain.__getitems__([9, 2, 0])[0][0], rtol=0, atol=0)
    torch.testing.assert_close(plain[9][0], plain.__getitems__([9])[0][0], rtol=0, atol=0)


def test_decoded_split_is_cached_on_disk(tmp_path, odd_sizes, monkeypatch):
    config = data_config(16)
    first = decode_split(odd_sizes, [0, 2, 4], size=(16, 16), train=True, data_config=config, cache_dir=str(tmp_path))
    (cached,) = tmp_path.glob("*.safetensors")

    def no_decoding(path):
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(memory_data, "_read_rgb", no_decoding)
        again = decode_split(odd_sizes, [0, 2, 4], size=(16, 16), train=True, data_config=config, cache_dir=str(tmp_path))
    assert all(torch.equal(getattr(first, k), getattr(again, k)) for k in ("images", "targets", "aspect"))
    cached.write_bytes(b"half a file")  # damaged: decoded again
    again = decode_split(odd_sizes, [0, 2, 4], size=(16, 16), train=True, data_config=config, cache_dir=str(tmp_path))
    assert torch.equal(first.images, again.images)
    image = odd_sizes.samples[2][0]
    Image.new("RGB", (48, 24), (255, 0, 0)).save(image)  # a changed file is decoded again
    changed = decode_split(odd_sizes, [0, 2, 4], size=(16, 16), train=True, data_config=config, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and (changed.images[1] != first.images[1]).any()
    decode_split(odd_sizes, [0, 2, 4], size=(16, 16), train=False, data_config=config, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*.safetensors"))) == 3 and cached.exists()  # evaluation geometry: its own entry


# ---- errors -------------------------------------------------------------------------------------
def test_per_image_options_and_bad_folders_are_named(tmp_path, monkeypatch):
    base = REPO / "configs" / "smoke.yaml"
    with pytest.raises(ConfigError, match=r"aug.auto_augment='rand-m9-mstd0.5-inc1'.*data.cache: memory.*aug.auto_augment: null"):
        load_config(base, ["--data.cache", "memory", "--aug.auto_augment", "rand-m9-mstd0.5-inc1"])
    with pytest.raises(ConfigError, match=r"aug.color_jitter=0.4.*set aug.color_jitter: null, or data.cache: none"):
        load_config(base, ["--data.cache", "memory", "--aug.color_jitter", "0.4"])
    with pytest.raises(ConfigError, match=r"data.interpolation='lanczos'.*bilinear, bicubic or nearest"):
        load_config(base, ["--data.cache", "memory", "--data.interpolation", "lanczos"])
    with pytest.raises(ConfigError, match=r"data.cache: must be one of \('none', 'memory'\)"):
        load_config(base, ["--data.cache", "ram"])
    cfg = load_config(base, ["--data.cache", "memory", "--data.path", str(tmp_path / "missing")])
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(cfg.data, cfg.aug, data_config(), seed=0)
    for split in ("train", "test"):
        (tmp_path / "ds" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "ds" / split / "cat" / "0.png")
    (tmp_path / "ds" / "train" / "cat" / "1.png").write_bytes(b"not a png")
    cfg = load_config(base, ["--data.cache", "memory", "--data.path", str(tmp_path / "ds")])
    with pytest.raises(DataError, match=r"cannot read image .*cat.*1\.png"):
        build_datasets(cfg.data, cfg.aug, data_config(8), seed=0)
    with pytest.raises(ConfigError, match="interpolation 'random'.*data.interpolation"):
        build_datasets(cfg.data, cfg.aug, data_config(8, interpolation="random"), seed=0)
    monkeypatch.setattr(memory_data, "_available_memory", lambda: 1000)
    with pytest.raises(DataError, match=r"would hold 1 images of 3x32x32.*use data.cache: none"):
        decode_split(scan_image_folder(tmp_path / "ds" / "test"), None, size=(32, 32), train=False, data_config=data_config())


def test_memory_datasets_through_build_datasets():
    cifar_dir("train")
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["--data.cache", "memory", "--data.path", str(CIFAR10)])
    train, val = build_datasets(cfg.data, cfg.aug, data_config(), seed=0)
    assert (len(train), len(val)) == (cfg.data.train_subset, cfg.data.val_subset)
    assert train.augment.scale == tuple(cfg.aug.scale) and val.augment is None
    n = cfg.data.train_subset
    assert sorted(train.targets.bincount().tolist()) == sorted(n // 10 + (c < n % 10) for c in range(10))  # balanced
    image, target = val[0]
    assert image.shape == (3, 32, 32) and isinstance(target, int) and math.isfinite(float(image.sum()))
