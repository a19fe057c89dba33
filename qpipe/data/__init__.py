"""Datasets by spec: ``digits``, ``npz:FILE``, ``imagenet:DIR``, ``cifar10:DIR``, ``synthetic[:CxHxW[:N]]``.

Every source has three splits: ``train`` (for ``qpipe train``), ``calib`` (calibration images, drawn from the
training data only) and ``test``. ``batches(split, batch_size, limit)`` yields ``(x float32 NCHW, y int64)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from qpipe.errors import QpipeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


class TensorSource:
    """In-memory splits."""

    def __init__(self, name: str, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], num_classes: int):
        self.name, self.splits, self.num_classes = name, splits, num_classes
        for split, (x, _) in splits.items():
            if len(x) == 0:
                raise QpipeError(f"data {name}: the {split} split is empty")
        self.input_shape = tuple(next(iter(splits.values()))[0].shape[1:])

    def size(self, split: str) -> int:
        return len(self.splits[split][0])

    def batches(self, split: str, batch_size: int = 256, limit: int | None = None,
                shuffle_seed: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.splits[split]
        n = len(x) if limit is None else min(limit, len(x))
        order = torch.arange(len(x))
        if shuffle_seed is not None:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(shuffle_seed))
        order = order[:n]
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]


DIGITS_TEST_FRACTION = 0.25   # 450 of 1797 images, stratified, random_state=0
DIGITS_CALIB_IMAGES = 512     # the first 512 training images of that split (calibration never sees test)


def digits() -> TensorSource:
    """scikit-learn's bundled 8x8 digits; pixels 0..16 mapped to [-1, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=DIGITS_TEST_FRACTION, random_state=0,
                                          stratify=d.target)
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt)
    return TensorSource("digits", {
        "train": (t(xtr, torch.float32), t(ytr, torch.int64)),
        "calib": (t(xtr[:DIGITS_CALIB_IMAGES], torch.float32), t(ytr[:DIGITS_CALIB_IMAGES], torch.int64)),
        "test": (t(xte, torch.float32), t(yte, torch.int64)),
    }, 10)


def npz(path: str) -> TensorSource:
    """Arrays ``x`` (N,C,H,W or N,H,W) and ``y`` (N,); optional ``x_train/y_train``, ``x_test/y_test``."""
    p = Path(path)
    if not p.is_file():
        raise QpipeError(f"data file {path} does not exist")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise QpipeError(f"data file {path} is not a readable .npz ({type(e).__name__})") from e

    def pair(xk, yk):
        if xk not in arrays or yk not in arrays:
            return None
        x = arrays[xk].astype(np.float32)
        if x.ndim == 3:
            x = x[:, None]
        yraw = arrays[yk].reshape(-1)
        if yraw.dtype.kind not in "iuf" or (yraw.size and (not np.isfinite(yraw).all() or (yraw < 0).any()
                                                          or (yraw != np.round(yraw)).any())):
            raise QpipeError(f"data file {path}: labels {yk} must be non-negative integers")
        y = yraw.astype(np.int64)
        if x.ndim != 4 or len(x) != len(y):
            raise QpipeError(f"data file {path}: {xk} must be N x C x H x W with one label per image, "
                             f"got {arrays[xk].shape} and {arrays[yk].shape}")
        if not np.isfinite(x).all():
            raise QpipeError(f"data file {path}: {xk} has NaN/Inf values")
        return torch.from_numpy(x), torch.from_numpy(y)

    base = pair("x", "y")
    train = pair("x_train", "y_train") or base
    test = pair("x_test", "y_test") or base
    if train is None or test is None:
        raise QpipeError(f"data file {path} needs arrays 'x' and 'y' (has {sorted(arrays)})")
    labels = torch.cat([train[1], test[1]])
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    return TensorSource(f"npz:{path}", {"train": train, "calib": train, "test": test}, n_classes)


def synthetic(spec: str, default_shape: tuple[int, ...]) -> TensorSource:
    """Seeded random images for latency runs: ``synthetic[:CxHxW[:N]]``; labels are random."""
    parts = spec.split(":")[1:]
    shape = tuple(int(v) for v in parts[0].split("x")) if parts and parts[0] else tuple(default_shape)
    n = int(parts[1]) if len(parts) > 1 else 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *shape), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorSource(spec, {"train": (x, y), "calib": (x, y), "test": (x, y)}, 10)


class CIFAR10Source(TensorSource):
    """The binary ``cifar-10-batches-bin`` files: records of 1 label byte + 3072 pixel bytes (RGB planes)."""

    def __init__(self, root: str):
        r = Path(root)
        if (r / "cifar-10-batches-bin").is_dir():
            r = r / "cifar-10-batches-bin"
        train_files = sorted(r.glob("data_batch_*.bin"))
        test_file = r / "test_batch.bin"
        if not train_files or not test_file.is_file():
            raise QpipeError(f"cifar10:{root} needs data_batch_*.bin and test_batch.bin (cifar-10-batches-bin)")
        mean = torch.tensor(CIFAR_MEAN)[:, None, None]
        std = torch.tensor(CIFAR_STD)[:, None, None]

        def read(files):
            raw = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files])
            if raw.size % 3073:
                raise QpipeError(f"cifar10:{root}: file sizes are not a multiple of 3073-byte records")
            rec = raw.reshape(-1, 3073)
            x = torch.from_numpy(rec[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
            return (x - mean) / std, torch.from_numpy(rec[:, 0].astype(np.int64))

        train = read(train_files)
        super().__init__(f"cifar10:{root}", {"train": train, "calib": train, "test": read([test_file])}, 10)


class ImageFolderSource:
    """ImageFolder layout (``DIR/{train,val}/CLASS/*.JPEG`` or ``DIR/CLASS/*``), read lazily with Pillow:
    resize the shorter side to 256, center-crop 224, scale to [0, 1], normalise with the ImageNet mean/std."""

    def __init__(self, root: str, resize: int = 256, crop: int = 224):
        r = Path(root)
        if not r.is_dir():
            raise QpipeError(f"imagenet:{root} is not a directory")
        self.name, self.resize, self.crop = f"imagenet:{root}", resize, crop
        # DIR/val and DIR/train; either alone serves all splits; without both, DIR/CLASS serves all splits
        # (then calibration reads the evaluation images: give a train/ folder to keep them apart)
        train_dir = r / "train" if (r / "train").is_dir() else None
        test_dir = r / "val" if (r / "val").is_dir() else (train_dir or r)
        train_dir = train_dir or test_dir
        classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
        if not classes:
            raise QpipeError(f"imagenet:{root}: no class folders found in {train_dir}")
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.num_classes = len(classes)
        self.input_shape = (3, crop, crop)

        def files(d):
            out = []
            for c in classes:
                if (d / c).is_dir():
                    out += [(f, self.class_to_idx[c]) for f in sorted((d / c).iterdir())
                            if f.suffix.lower() in IMAGE_SUFFIXES]
            return out

        self.files = {"test": files(test_dir), "train": files(train_dir)}
        self.files["calib"] = self.files["train"]
        for split, f in self.files.items():
            if not f:
                raise QpipeError(f"imagenet:{root}: no images for the {split} split")

    def size(self, split: str) -> int:
        return len(self.files[split])

    def load(self, path: Path) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = self.resize / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = int(round((w - self.crop) / 2)), int(round((h - self.crop) / 2))
            im = im.crop((left, top, left + self.crop, top + self.crop))
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]

    def batches(self, split: str, batch_size: int = 64, limit: int | None = None,
                shuffle_seed: int | None = None):
        items = self.files[split]
        if shuffle_seed is not None:
            perm = np.random.default_rng(shuffle_seed).permutation(len(items))
            items = [items[i] for i in perm]
        items = items if limit is None else items[:limit]
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            yield torch.stack([self.load(f) for f, _ in chunk]), torch.tensor([c for _, c in chunk])


class IterableSource:
    """Any iterable of ``(x, y)`` batches (the Python API's ``data``): every split reads the same batches."""

    def __init__(self, batches, num_classes: int | None = None):
        self.name = f"<{type(batches).__name__}>"
        self.items = [(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))
                      for x, y in batches]
        if not self.items or sum(len(x) for x, _ in self.items) == 0:
            raise QpipeError("data: the iterable of (x, y) batches is empty")
        self.input_shape = tuple(self.items[0][0].shape[1:])
        self.num_classes = num_classes or int(max(int(y.max()) for _, y in self.items)) + 1

    def size(self, split: str) -> int:
        return sum(len(x) for x, _ in self.items)

    def batches(self, split: str, batch_size: int = 0, limit: int | None = None, shuffle_seed: int | None = None):
        seen = 0
        for x, y in self.items:
            if limit is not None and seen >= limit:
                return
            take = len(x) if limit is None else min(len(x), limit - seen)
            seen += take
            yield x[:take], y[:take]


def as_source(data, default_shape: tuple[int, ...] = (1, 8, 8)):
    """A data source from a spec string, a source object, or an iterable of ``(x, y)`` batches."""
    if isinstance(data, str):
        return load_data(data, default_shape)
    if hasattr(data, "batches") and hasattr(data, "input_shape"):
        return data
    return IterableSource(data)


def load_data(spec: str, default_shape: tuple[int, ...] = (1, 8, 8)):
    """A data source from its spec string."""
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        return digits()
    if kind == "npz" and arg:
        return npz(arg)
    if kind == "cifar10" and arg:
        return CIFAR10Source(arg)
    if kind == "imagenet" and arg:
        return ImageFolderSource(arg)
    if kind == "synthetic":
        return synthetic(spec, default_shape)
    raise QpipeError(f"unknown data spec {spec!r}; use digits, npz:FILE, imagenet:DIR, cifar10:DIR or synthetic")
