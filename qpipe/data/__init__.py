"""Datasets by spec: ``digits``, ``npz:FILE``, ``imagenet:DIR``, ``cifar10:DIR``, ``synthetic[:CxHxW[:N]]``.

Every source has three splits: ``train`` (for ``qpipe train``), ``calib`` (calibration samples, drawn from the
training data only) and ``test``. ``batches(split, batch_size, limit)`` yields ``(x, y)``: ``x`` one float32
tensor (N x C x H x W for images) or, for models with several inputs, a dict of named tensors
(``qpipe.inputs``; integer arrays such as token ids and masks keep an integer dtype); ``y`` int64 labels, or
None where the data has none (an embedding model is compared with its FP32 outputs instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from qpipe import inputs
from qpipe.errors import QpipeError
from qpipe.inputs import Batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


class TensorSource:
    """In-memory splits: ``split -> (x, y)`` with ``x`` a tensor or a dict of named tensors and ``y`` labels or
    None."""

    def __init__(self, name: str, splits: dict[str, tuple[Batch, torch.Tensor | None]], num_classes: int | None):
        self.name, self.splits, self.num_classes = name, splits, num_classes
        for split, (x, _) in splits.items():
            if inputs.batch_len(x) == 0:
                raise QpipeError(f"data {name}: the {split} split is empty")
        first = next(iter(splits.values()))[0]
        self.input_names = list(first) if inputs.is_named(first) else None
        self.input_shape = tuple(inputs.items(first)[0][1].shape[1:])

    def size(self, split: str) -> int:
        return inputs.batch_len(self.splits[split][0])

    def batches(self, split: str, batch_size: int = 256, limit: int | None = None,
                shuffle_seed: int | None = None) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        x, y = self.splits[split]
        size = inputs.batch_len(x)
        n = size if limit is None else min(limit, size)
        order = torch.arange(size)
        if shuffle_seed is not None:
            order = torch.randperm(size, generator=torch.Generator().manual_seed(shuffle_seed))
        order = order[:n]
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield inputs.take(x, idx), (y[idx] if y is not None else None)


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
    """Arrays ``x`` (N,C,H,W, N,H,W or N,F) and ``y`` (N,), optionally ``x_train/y_train``, ``x_test/y_test``; or,
    for a model with named inputs, arrays named after them (``input_ids``, ``attention_mask``, ...; see
    ``named_npz``)."""
    p = Path(path)
    if not p.is_file():
        raise QpipeError(f"data file {path} does not exist")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise QpipeError(f"data file {path} is not a readable .npz ({type(e).__name__})") from e
    if not {"x", "x_train", "x_test"} & set(arrays):
        return named_npz(path, arrays)

    def pair(xk, yk):
        if xk not in arrays or yk not in arrays:
            return None
        x = _float_array(path, xk, arrays[xk])
        if x.ndim == 3:
            x = x[:, None]
        y = _labels(path, yk, arrays[yk])
        if x.ndim < 2 or len(x) != len(y):
            raise QpipeError(f"data file {path}: {xk} must be N x C x H x W (or N x features) with one label per "
                             f"sample, got {arrays[xk].shape} and {arrays[yk].shape}")
        return torch.from_numpy(x), torch.from_numpy(y)

    base = pair("x", "y")
    train = pair("x_train", "y_train") or base
    test = pair("x_test", "y_test") or base
    if train is None or test is None:
        raise QpipeError(f"data file {path} needs arrays 'x' and 'y' (has {sorted(arrays)})")
    labels = torch.cat([train[1], test[1]])
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    return TensorSource(f"npz:{path}", {"train": train, "calib": train, "test": test}, n_classes)


LABEL_NAMES = ("y", "labels")
SPLIT_SUFFIXES = {"_train": "train", "_test": "test"}


def named_npz(path: str, arrays: dict[str, np.ndarray]) -> TensorSource:
    """A model's named inputs: every array is an input named as the model's argument (``input_ids``,
    ``attention_mask``, ``pixel_values``, ...), dimension 0 the sample; ``NAME_train`` / ``NAME_test`` hold a
    split of their own (calibration reads ``train``). Integer and boolean arrays become int64 (never quantized),
    floats float32. Labels ``y`` / ``labels`` (same suffixes) are optional: without them evaluate compares
    outputs with the FP32 model."""
    split_arrays: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    for name, a in arrays.items():
        stem, split = name, None
        for suffix, s in SPLIT_SUFFIXES.items():
            if name.endswith(suffix) and len(name) > len(suffix):
                stem, split = name[: -len(suffix)], s
        for s in ((split,) if split else ("train", "test")):
            if split or stem not in split_arrays[s]:
                split_arrays[s][stem] = a
    splits = {}
    for s, named in split_arrays.items():
        y_name = next((k for k in LABEL_NAMES if k in named), None)
        y = torch.from_numpy(_labels(path, y_name, named.pop(y_name))) if y_name else None
        for k in LABEL_NAMES:
            named.pop(k, None)
        if not named:
            raise QpipeError(f"data file {path} has no input arrays (has {sorted(arrays)})")
        x = {}
        for k, a in named.items():
            if a.ndim == 0:
                raise QpipeError(f"data file {path}: array {k!r} is a scalar; inputs need a sample axis first")
            if a.dtype.kind in "biu":
                x[k] = torch.from_numpy(a.astype(np.int64))
            elif a.dtype.kind == "f":
                x[k] = torch.from_numpy(_float_array(path, k, a))
            else:
                raise QpipeError(f"data file {path}: array {k!r} has dtype {a.dtype}; inputs are numbers")
        lengths = {k: len(v) for k, v in x.items()} | ({"labels": len(y)} if y is not None else {})
        if len(set(lengths.values())) > 1:
            raise QpipeError(f"data file {path}: the {s} arrays have different sample counts ({lengths})")
        splits[s] = (x, y)
    splits["calib"] = splits["train"]
    labels = [y for _, y in splits.values() if y is not None]
    n_classes = int(torch.cat(labels).max()) + 1 if labels and sum(len(y) for y in labels) else None
    return TensorSource(f"npz:{path}", splits, n_classes)


def _float_array(path: str, name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise QpipeError(f"data file {path}: array {name!r} has dtype {a.dtype}; inputs are numbers")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise QpipeError(f"data file {path}: {name} has NaN/Inf values")
    return a


def _labels(path: str, name: str, raw: np.ndarray) -> np.ndarray:
    raw = raw.reshape(-1)
    if raw.dtype.kind not in "iuf" or (raw.size and (not np.isfinite(raw).all() or (raw < 0).any()
                                                     or (raw != np.round(raw)).any())):
        raise QpipeError(f"data file {path}: labels {name} must be non-negative integers")
    return raw.astype(np.int64)


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


class IterableSource(TensorSource):
    """Any iterable of batches (the Python API's ``data``): ``(x, y)`` pairs with ``x`` a tensor or a dict of
    named tensors, or dicts of named tensors alone (labels, if any, under ``labels``). Every split reads the same
    samples."""

    def __init__(self, batches, num_classes: int | None = None):
        xs, ys = [], []
        for item in batches:
            if isinstance(item, dict):
                item = dict(item)
                y = item.pop("labels", None)
                x = item
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                x, y = item
            else:
                raise QpipeError(f"data: each batch must be (x, y) or a dict of named inputs, got {type(item).__name__}")
            xs.append({k: _as_tensor(v, k) for k, v in x.items()} if isinstance(x, dict) else _as_tensor(x, "x"))
            ys.append(None if y is None else torch.as_tensor(y, dtype=torch.int64).reshape(-1))
        if not xs or sum(inputs.batch_len(x) for x in xs) == 0:
            raise QpipeError("data: the iterable of batches is empty")
        if any(y is None for y in ys) and not all(y is None for y in ys):
            raise QpipeError("data: some batches have labels and some do not")
        x = inputs.cat(xs)   # ragged sequence lengths: right-padded, masked (the batches themselves go out as given)
        y = None if ys[0] is None else torch.cat(ys)
        if y is not None and len(y) != inputs.batch_len(x):
            raise QpipeError(f"data: {len(y)} labels for {inputs.batch_len(x)} samples")
        if num_classes is None and y is not None:
            num_classes = int(y.max()) + 1
        super().__init__(f"<{type(batches).__name__}>", {"train": (x, y), "calib": (x, y), "test": (x, y)},
                         num_classes)
        self.sizes = [inputs.batch_len(b) for b in xs]
        self.given = xs

    def batches(self, split: str, batch_size: int = 0, limit: int | None = None, shuffle_seed: int | None = None):
        """The batches as given (``batch_size`` is the iterable's own), up to ``limit`` samples."""
        if shuffle_seed is not None:
            yield from super().batches(split, batch_size or max(self.sizes), limit, shuffle_seed)
            return
        _, y = self.splits[split]
        start = 0
        for b, size in zip(self.given, self.sizes, strict=True):
            take = size if limit is None else min(size, limit - start)
            if take <= 0:
                return
            idx = slice(start, start + take)
            yield inputs.take(b, slice(0, take)), (y[idx] if y is not None else None)
            start += size


def _as_tensor(v, name: str) -> torch.Tensor:
    """Floats as float32; integers and booleans (ids, masks) as int64, never cast to float."""
    t = torch.as_tensor(v)
    if t.dtype.is_complex:
        raise QpipeError(f"data: input {name!r} has dtype {t.dtype}; inputs are real numbers")
    return t.float() if t.dtype.is_floating_point else t.long()


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
