"""Data loaders by spec (imagenet:DIR, cifar10:DIR, npz:FILE, digits), on small files written into tmp_path."""

import numpy as np
import pytest
import torch
from helpers import write_cifar
from PIL import Image

from qpipe.data import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, load_data
from qpipe.errors import QpipeError

IM_MEAN = np.array(IMAGENET_MEAN)[:, None, None]
IM_STD = np.array(IMAGENET_STD)[:, None, None]
JPEG_LEVELS = 3      # a flat JPEG colour decodes within a few of its 0..255 levels
PIXEL_ATOL = 1e-6    # float32 pixels against their float64 values in [0, 1] (and unnormalised back)
FLOAT32_RTOL = 1e-6  # npz arrays are read as float32


def unnormalise_imagenet(x: torch.Tensor) -> np.ndarray:
    """Back to [0, 1] pixel values, C x H x W."""
    return x.double().numpy() * IM_STD + IM_MEAN


def save_image(path, size, colour=(128, 128, 128), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


# ---------------------------------------------------------------------------------------------- imagenet:DIR

# One colour per class, so that every decoded image tells which class folder it came from.
CLASS_COLOURS = {"cat": (200, 40, 10), "ant": (10, 128, 250), "dog": (90, 90, 90)}


@pytest.fixture
def imagenet_dir(tmp_path):
    """DIR/train/{ant,cat,dog}/ (PNG and JPEG, 300x260 and 240x320) and DIR/val/{ant,cat,dog}/ (JPEG)."""
    root = tmp_path / "imnet"
    for cls in ["dog", "ant", "cat"]:  # not in sorted order
        colour = CLASS_COLOURS[cls]
        save_image(root / "train" / cls / "a.png", (300, 260), colour)
        save_image(root / "train" / cls / "b.jpg", (240, 320), colour)
        save_image(root / "val" / cls / "v.jpg", (320, 240), colour)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_imagenet_class_indices_are_sorted_folder_names(imagenet_dir):
    src = load_data(f"imagenet:{imagenet_dir}")
    assert src.class_to_idx == {"ant": 0, "cat": 1, "dog": 2}
    assert src.num_classes == 3
    assert src.input_shape == (3, 224, 224)
    # notes.txt is not an image: 2 images per class in train, 1 in val
    assert (src.size("train"), src.size("calib"), src.size("test")) == (6, 6, 3)


@pytest.mark.parametrize("split", ["train", "calib", "test"])
def test_imagenet_batches_shapes_dtype_and_labels(imagenet_dir, split):
    src = load_data(f"imagenet:{imagenet_dir}")
    idx_to_colour = {src.class_to_idx[c]: col for c, col in CLASS_COLOURS.items()}
    batches = list(src.batches(split, batch_size=4))
    n = src.size(split)
    assert [len(y) for _, y in batches] == ([4, n - 4] if n > 4 else [n])
    for x, y in batches:
        assert x.shape == (len(y), 3, 224, 224)
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64
        for xi, yi in zip(x, y, strict=True):
            # the image's colour (JPEG: within a few levels) says which class folder it came from
            mean_rgb = unnormalise_imagenet(xi).mean(axis=(1, 2)) * 255
            np.testing.assert_allclose(mean_rgb, idx_to_colour[int(yi)], atol=JPEG_LEVELS)


def test_imagenet_limit_and_shuffle(imagenet_dir):
    src = load_data(f"imagenet:{imagenet_dir}")
    assert sum(len(y) for _, y in src.batches("train", batch_size=2, limit=3)) == 3
    plain = torch.cat([y for _, y in src.batches("train")])
    assert plain.tolist() == [0, 0, 1, 1, 2, 2]
    shuffled = torch.cat([y for _, y in src.batches("train", shuffle_seed=1)])
    again = torch.cat([y for _, y in src.batches("train", shuffle_seed=1)])
    assert sorted(shuffled.tolist()) == plain.tolist()
    assert shuffled.tolist() == again.tolist()


@pytest.mark.parametrize("size", [(300, 260), (240, 320), (224, 224), (1000, 250)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_imagenet_normalisation_is_imagenet_mean_std(tmp_path, size):
    colour = (10, 128, 250)  # a different value per channel also checks the channel order
    save_image(tmp_path / "d" / "only" / "img.png", size, colour)
    x, _ = next(load_data(f"imagenet:{tmp_path / 'd'}").batches("test"))
    expected = (np.array(colour)[:, None, None] / 255 - IM_MEAN) / IM_STD
    assert x.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(x[0].double().numpy(), np.broadcast_to(expected, (3, 224, 224)), atol=PIXEL_ATOL)


def test_imagenet_resize_256_center_crop_224_columns(tmp_path):
    # 400x200, black for x < 150. Shorter side 200 -> 256: 512x256, the edge moves to x = 150 * 1.28 = 192;
    # center crop: left = (512 - 224) / 2 = 144, top = 16, so the edge is at column 192 - 144 = 48.
    img = np.full((200, 400, 3), 255, np.uint8)
    img[:, :150] = 0
    save_dir = tmp_path / "d" / "c"
    save_dir.mkdir(parents=True)
    Image.fromarray(img).save(save_dir / "p.png")
    x, _ = next(load_data(f"imagenet:{tmp_path / 'd'}").batches("test"))
    px = unnormalise_imagenet(x[0])
    assert np.allclose(px[:, :, :46], 0, atol=PIXEL_ATOL)
    assert np.allclose(px[:, :, 51:], 1, atol=PIXEL_ATOL)
    column = px.mean(axis=(0, 1))
    assert int((column < 0.5).sum()) == 48
    # every row is the same: no vertical structure was invented
    np.testing.assert_allclose(px, np.broadcast_to(px[:, :1, :], px.shape), atol=PIXEL_ATOL)


def test_imagenet_resize_256_center_crop_224_rows(tmp_path):
    # 240x320 (w x h), white for y < 200. Shorter side 240 -> 256: 256x341 (320 * 256 / 240 = 341.3),
    # the edge moves to y = 200 * 256 / 240 = 213.3; top = round((341 - 224) / 2) = 58, edge at row 155.3.
    img = np.zeros((320, 240, 3), np.uint8)
    img[:200] = 255
    save_dir = tmp_path / "d" / "c"
    save_dir.mkdir(parents=True)
    Image.fromarray(img).save(save_dir / "p.png")
    x, _ = next(load_data(f"imagenet:{tmp_path / 'd'}").batches("test"))
    px = unnormalise_imagenet(x[0])
    assert np.allclose(px[:, :153, :], 1, atol=PIXEL_ATOL)
    assert np.allclose(px[:, 158:, :], 0, atol=PIXEL_ATOL)
    row = px.mean(axis=(0, 2))
    assert int((row > 0.5).sum()) in (155, 156)


def test_imagenet_without_val_uses_the_same_folder_for_all_splits(tmp_path):
    root = tmp_path / "flat"
    for cls in ["b", "a"]:
        save_image(root / cls / "1.png", (260, 260))
        save_image(root / cls / "2.jpg", (300, 240))
    src = load_data(f"imagenet:{root}")
    assert src.class_to_idx == {"a": 0, "b": 1}
    assert src.files["train"] == src.files["test"] == src.files["calib"]
    assert [(f.parent.name, f.name, c) for f, c in src.files["test"]] == [
        ("a", "1.png", 0), ("a", "2.jpg", 0), ("b", "1.png", 1), ("b", "2.jpg", 1)]


def test_imagenet_val_only_layout_uses_val_for_all_splits(tmp_path):
    for cls in ["x", "y"]:
        save_image(tmp_path / "r" / "val" / cls / "1.jpg", (256, 256))
    src = load_data(f"imagenet:{tmp_path / 'r'}")
    assert src.class_to_idx == {"x": 0, "y": 1}
    assert src.size("train") == src.size("test") == 2


def test_imagenet_train_only_layout_uses_train_for_all_splits(tmp_path):
    for cls in ["x", "y"]:
        save_image(tmp_path / "r" / "train" / cls / "1.jpg", (256, 256))
    src = load_data(f"imagenet:{tmp_path / 'r'}")
    assert src.size("train") == src.size("test") == 2


def test_imagenet_empty_dir_raises(tmp_path):
    with pytest.raises(QpipeError, match="no class folders"):
        load_data(f"imagenet:{tmp_path}")


def test_imagenet_class_folders_without_images_raise(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(QpipeError, match="no images"):
        load_data(f"imagenet:{tmp_path}")


def test_imagenet_missing_dir_raises(tmp_path):
    with pytest.raises(QpipeError, match="not a directory"):
        load_data(f"imagenet:{tmp_path / 'nope'}")


# ---------------------------------------------------------------------------------------------- cifar10:DIR

def expected_pixels(rec: np.ndarray) -> np.ndarray:
    """Pixel (n, c, h, w) is byte 1 + 1024 c + 32 h + w of record n, scaled to [0, 1]."""
    c, h, w = np.indices((3, 32, 32))
    return rec[:, 1 + 1024 * c + 32 * h + w] / 255.0


@pytest.mark.parametrize("which", ["parent_dir", "batches_dir"])
def test_cifar10_labels_and_pixels(tmp_path, which):
    d, train, test = write_cifar(tmp_path)
    src = load_data(f"cifar10:{tmp_path if which == 'parent_dir' else d}")
    assert (src.size("train"), src.size("calib"), src.size("test")) == (8, 8, 4)
    assert src.num_classes == 10 and src.input_shape == (3, 32, 32)
    mean = np.array(CIFAR_MEAN)[:, None, None]
    std = np.array(CIFAR_STD)[:, None, None]
    for split, rec in [("train", train), ("calib", train), ("test", test)]:
        x, y = next(src.batches(split, batch_size=100))
        assert x.dtype == torch.float32 and x.shape == (len(rec), 3, 32, 32)
        assert y.dtype == torch.int64
        assert y.tolist() == rec[:, 0].tolist()
        np.testing.assert_allclose(x.double().numpy() * std + mean, expected_pixels(rec), atol=PIXEL_ATOL)


def test_cifar10_single_known_pixel(tmp_path):
    d, train, _ = write_cifar(tmp_path, n_train=(1,))
    rec = np.zeros((1, 3073), np.uint8)
    rec[0, 0] = 7
    rec[0, 1 + 1024 * 1 + 32 * 3 + 5] = 200  # green plane, row 3, column 5
    rec.tofile(d / "data_batch_1.bin")
    x, y = next(load_data(f"cifar10:{tmp_path}").batches("train"))
    px = x[0].double().numpy() * np.array(CIFAR_STD)[:, None, None] + np.array(CIFAR_MEAN)[:, None, None]
    assert y.tolist() == [7]
    assert px[1, 3, 5] == pytest.approx(200 / 255, abs=PIXEL_ATOL)
    px[1, 3, 5] = 0
    assert np.abs(px).max() < PIXEL_ATOL


@pytest.mark.parametrize("name", ["data_batch_1.bin", "test_batch.bin"])
def test_cifar10_truncated_file_raises(tmp_path, name):
    d, _, _ = write_cifar(tmp_path)
    raw = (d / name).read_bytes()
    (d / name).write_bytes(raw[:-100])
    with pytest.raises(QpipeError, match="3073"):
        load_data(f"cifar10:{tmp_path}")


def test_cifar10_missing_test_batch_raises(tmp_path):
    d, _, _ = write_cifar(tmp_path)
    (d / "test_batch.bin").unlink()
    with pytest.raises(QpipeError, match="test_batch.bin"):
        load_data(f"cifar10:{tmp_path}")


def test_cifar10_missing_train_batches_raise(tmp_path):
    d, _, _ = write_cifar(tmp_path, n_train=(2,))
    (d / "data_batch_1.bin").unlink()
    with pytest.raises(QpipeError, match="data_batch"):
        load_data(f"cifar10:{tmp_path}")


# ---------------------------------------------------------------------------------------------- npz:FILE

def test_npz_x_y_without_channel_axis(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 6, 7)).astype(np.float64)
    y = np.array([0, 3, 1, 3, 2])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    src = load_data(f"npz:{tmp_path / 'd.npz'}")
    assert src.input_shape == (1, 6, 7)
    assert src.num_classes == 4
    for split in ["train", "calib", "test"]:
        xb, yb = next(src.batches(split))
        assert xb.dtype == torch.float32 and xb.shape == (5, 1, 6, 7)
        np.testing.assert_allclose(xb[:, 0].numpy(), x, rtol=FLOAT32_RTOL)
        assert yb.dtype == torch.int64 and yb.tolist() == y.tolist()


def test_npz_train_test_variant(tmp_path):
    rng = np.random.default_rng(1)
    xtr, xte = rng.normal(size=(6, 2, 4, 4)), rng.normal(size=(3, 2, 4, 4))
    np.savez(tmp_path / "d.npz", x_train=xtr, y_train=[0, 1, 0, 1, 0, 1], x_test=xte, y_test=[4, 0, 1])
    src = load_data(f"npz:{tmp_path / 'd.npz'}")
    assert (src.size("train"), src.size("calib"), src.size("test")) == (6, 6, 3)
    assert src.num_classes == 5  # the largest label of either split
    xb, yb = next(src.batches("test"))
    np.testing.assert_allclose(xb.numpy(), xte, rtol=FLOAT32_RTOL)
    assert yb.tolist() == [4, 0, 1]
    xb, yb = next(src.batches("calib"))
    np.testing.assert_allclose(xb.numpy(), xtr, rtol=FLOAT32_RTOL)


def test_npz_missing_file_raises(tmp_path):
    with pytest.raises(QpipeError, match="does not exist"):
        load_data(f"npz:{tmp_path / 'nope.npz'}")


def test_npz_not_an_npz_raises(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"certainly not a zip file" * 10)
    with pytest.raises(QpipeError, match="not a readable .npz"):
        load_data(f"npz:{tmp_path / 'd.npz'}")


def test_npz_object_array_is_not_unpickled(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(QpipeError):
        load_data(f"npz:{tmp_path / 'd.npz'}")


@pytest.mark.parametrize("arrays,message", [
    pytest.param({"x": np.zeros((2, 8, 8))}, "needs arrays 'x' and 'y'", id="x_without_y"),
    pytest.param({"y": np.zeros(2)}, "has no input arrays", id="y_without_x"),
    pytest.param({"input_ids": np.zeros((3, 4), np.int64), "attention_mask": np.ones((2, 4), np.int64)},
                 "different sample counts", id="ragged_named"),
    pytest.param({"input_ids": np.array(["a", "b"])}, "dtype", id="strings"),
])
def test_npz_bad_arrays_raise(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(QpipeError, match=message):
        load_data(f"npz:{tmp_path / 'd.npz'}")


def test_npz_named_arrays_keep_integer_inputs_and_split_by_suffix(tmp_path):
    ids = np.arange(24).reshape(6, 4)
    np.savez(tmp_path / "d.npz", input_ids_train=ids, attention_mask=np.ones((6, 4), np.bool_),
             input_ids_test=ids[:6] + 100)
    src = load_data(f"npz:{tmp_path / 'd.npz'}")
    assert src.input_names == ["input_ids", "attention_mask"] and src.num_classes is None
    (x, y), = list(src.batches("calib", 8))
    assert y is None and x["input_ids"].dtype == torch.int64 and x["attention_mask"].dtype == torch.int64
    assert x["input_ids"].tolist() == ids.tolist()
    (xt, _), = list(src.batches("test", 8))
    assert int(xt["input_ids"][0, 0]) == 100


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "neg_inf"])
@pytest.mark.parametrize("key", ["x", "x_test"])
def test_npz_non_finite_values_raise(tmp_path, bad, key):
    x = np.zeros((3, 1, 4, 4), np.float32)
    x[1, 0, 2, 3] = bad
    arrays = {"x": x, "y": np.arange(3)}
    if key == "x_test":
        arrays = {"x_train": np.zeros((3, 1, 4, 4)), "y_train": np.arange(3), "x_test": x, "y_test": np.arange(3)}
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(QpipeError, match=f"{key} has NaN/Inf"):
        load_data(f"npz:{tmp_path / 'd.npz'}")


@pytest.mark.parametrize("x,y", [
    pytest.param(np.zeros((0, 1, 8, 8)), np.zeros(0), id="zero_images"),
    pytest.param(np.zeros(0), np.zeros(0), id="empty_1d"),
    pytest.param(np.zeros((0, 8, 8)), np.zeros(0), id="zero_images_no_channel"),
])
def test_npz_empty_arrays_raise(tmp_path, x, y):
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(QpipeError):
        load_data(f"npz:{tmp_path / 'd.npz'}")


@pytest.mark.parametrize("x,y", [
    pytest.param(np.zeros((3, 1, 4, 4)), np.zeros(2), id="fewer_labels"),
    pytest.param(np.zeros(3), np.zeros(3), id="1d_x"),
])
def test_npz_bad_shapes_raise(tmp_path, x, y):
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(QpipeError, match="N x C x H x W"):
        load_data(f"npz:{tmp_path / 'd.npz'}")


def test_npz_feature_vectors_load_as_they_are(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((5, 7)), y=np.arange(5))
    src = load_data(f"npz:{tmp_path / 'd.npz'}")
    assert src.input_shape == (7,) and src.input_names is None


@pytest.mark.parametrize("y", [[0.0, np.nan, 1.0], [0, -1, 1]], ids=["nan_label", "negative_label"])
def test_npz_invalid_labels_raise(tmp_path, y):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 1, 4, 4)), y=np.array(y))
    with pytest.raises(QpipeError):
        load_data(f"npz:{tmp_path / 'd.npz'}")


# ---------------------------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits_source():
    return load_data("digits")


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.tobytes() for r in x.reshape(len(x), -1).numpy()}


def test_digits_split_sizes_and_shapes(digits_source):
    assert (digits_source.size("train"), digits_source.size("calib"), digits_source.size("test")) == (1347, 512, 450)
    assert digits_source.input_shape == (1, 8, 8)
    assert digits_source.num_classes == 10
    x, y = next(digits_source.batches("test", batch_size=1000))
    assert x.shape == (450, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))


def test_digits_calib_is_drawn_from_train_and_test_is_disjoint(digits_source):
    xtr, ytr = digits_source.splits["train"]
    xca, yca = digits_source.splits["calib"]
    xte, _ = digits_source.splits["test"]
    train_rows = rows(xtr)
    assert rows(xca) <= train_rows
    assert not rows(xte) & train_rows
    # calibration never sees test images, and every one of the 1797 images is in exactly one of train/test
    assert not rows(xca) & rows(xte)
    assert len(train_rows | rows(xte)) == 1797
    assert torch.equal(yca, ytr[:512])


def test_digits_values_in_minus_one_one(digits_source):
    for split in ["train", "calib", "test"]:
        x, _ = digits_source.splits[split]
        assert x.min() >= -1 and x.max() <= 1
    x, _ = digits_source.splits["train"]
    assert x.min() == -1 and x.max() == 1  # the whole range 0..16 is used


def test_digits_split_is_deterministic(digits_source):
    again = load_data("digits")
    for split in ["train", "calib", "test"]:
        assert torch.equal(again.splits[split][0], digits_source.splits[split][0])
        assert torch.equal(again.splits[split][1], digits_source.splits[split][1])


# ---------------------------------------------------------------------------------------------- specs

@pytest.mark.parametrize("spec", ["mnist", "", "npz", "npz:", "imagenet:", "cifar10", "cifar10:", "Digits"])
def test_unknown_spec_raises(spec):
    with pytest.raises(QpipeError, match="unknown data spec"):
        load_data(spec)


def test_dict_batches_of_different_lengths_go_out_as_given_and_join_padded_and_masked():
    from qpipe.data import as_source

    b1 = {"input_ids": torch.full((2, 5), 7), "attention_mask": torch.ones(2, 5, dtype=torch.int64)}
    b2 = {"input_ids": torch.full((3, 8), 9), "attention_mask": torch.ones(3, 8, dtype=torch.int64), "labels": [0, 1, 2]}
    with pytest.raises(QpipeError, match="some batches have labels"):
        as_source([b1, b2])
    b1["labels"] = [1, 1]
    src = as_source([b1, b2])
    assert [tuple(x["input_ids"].shape) for x, _ in src.batches("calib")] == [(2, 5), (3, 8)]
    joined, y = src.splits["calib"]
    assert joined["input_ids"].shape == (5, 8) and y.tolist() == [1, 1, 0, 1, 2]
    assert joined["attention_mask"].sum(1).tolist() == [5, 5, 8, 8, 8]   # the added positions are masked
    with pytest.raises(QpipeError, match="need an attention_mask"):
        as_source([{"input_ids": torch.ones(2, 5, dtype=torch.int64)}, {"input_ids": torch.ones(2, 6, dtype=torch.int64)}])
