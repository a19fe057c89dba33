"""Model zoo (torchvision-compatible keys) and model/checkpoint loading: formats, safety, validation, user models."""

import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qpipe.errors import QpipeError
from qpipe.models import REGISTRY, ROOT, build_model, load_model, n_params

pytestmark = pytest.mark.usefixtures("one_thread")




# ---------------------------------------------------------------------------------------------- model zoo


def bn_keys(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def torchvision_resnet18_keys() -> dict[str, tuple[int, ...]]:
    """torchvision.models.resnet18().state_dict(): names, order and shapes."""
    keys = {"conv1.weight": (64, 3, 7, 7), **bn_keys("bn1", 64)}
    cin = 64
    for stage, width in enumerate([64, 128, 256, 512], start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            keys[f"{p}.conv1.weight"] = (width, cin, 3, 3)
            keys.update(bn_keys(f"{p}.bn1", width))
            keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
            keys.update(bn_keys(f"{p}.bn2", width))
            if block == 0 and stage > 1:
                keys[f"{p}.downsample.0.weight"] = (width, cin, 1, 1)
                keys.update(bn_keys(f"{p}.downsample.1", width))
            cin = width
    keys["fc.weight"] = (1000, 512)
    keys["fc.bias"] = (1000,)
    return keys


def test_resnet18_state_dict_matches_torchvision():
    sd = build_model("resnet18").state_dict()
    expected = torchvision_resnet18_keys()
    assert len(expected) == 122
    assert list(sd) == list(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # spot checks written out by hand
    assert sd["fc.weight"].shape == (1000, 512)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert "layer1.0.downsample.0.weight" not in sd


def test_resnet18_parameter_count_and_output():
    model = build_model("resnet18").eval()
    assert n_params(model) == 11_689_512  # torchvision's resnet18
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_resnet20_three_stages_of_three_blocks():
    model = build_model("resnet20").eval()
    sd = model.state_dict()
    assert sd["conv1.weight"].shape == (16, 3, 3, 3)  # CIFAR stem: one 3x3 conv, no max-pool
    for stage, width in enumerate([16, 32, 64], start=1):
        layer = getattr(model, f"layer{stage}")
        assert len(layer) == 3
        for block in layer:
            assert block.conv1.out_channels == block.conv2.out_channels == width
        assert layer[0].conv1.stride == ((1, 1) if stage == 1 else (2, 2))
        # projection shortcuts only where the shape changes
        assert [b.downsample is not None for b in layer] == [stage > 1, False, False]
    assert not hasattr(model, "layer4")
    assert sd["fc.weight"].shape == (10, 64)
    assert n_params(model) == 272_474  # 269,722 of the option-A ResNet20 plus two 1x1 projections with BN
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_digits_cnn_size_and_output():
    model = build_model("digits-cnn").eval()
    assert 20_000 <= n_params(model) <= 60_000
    with torch.no_grad():
        assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_input_shape_runs(name):
    info = REGISTRY[name]
    model = info.build().eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *info.input_shape))
    assert out.shape[0] == 1 and out.ndim == 2


def test_shipped_digits_checkpoint_is_loaded_by_default():
    ckpt = ROOT / REGISTRY["digits-cnn"].checkpoint
    shipped = load_file(str(ckpt))
    model = load_model("digits-cnn")
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, shipped[k]), k


# ---------------------------------------------------------------------------------------------- checkpoints


def randomised(spec: str, seed: int = 0) -> nn.Module:
    """A model whose every tensor (BN running statistics included) differs from a fresh build."""
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v) * 0.3)
    return model.eval()


def write_checkpoint(sd: dict, path, fmt: str):
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pth":
        torch.save(sd, path)
    elif fmt == "wrapped_state_dict":
        torch.save({"state_dict": sd, "epoch": 7, "arch": "x"}, path)
    elif fmt == "wrapped_model_state_dict":
        torch.save({"model_state_dict": sd, "optimizer_state_dict": {"lr": 0.1}}, path)
    elif fmt == "module_prefix":  # nn.DataParallel / DDP
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif fmt == "wrapped_module_prefix":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        raise ValueError(fmt)


FORMATS = ["pth", "wrapped_state_dict", "wrapped_model_state_dict", "module_prefix", "wrapped_module_prefix",
           "safetensors"]


@pytest.mark.parametrize("spec,fmt", [("digits-cnn", f) for f in FORMATS] + [
    ("resnet20", "pth"), ("resnet20", "safetensors")], ids=lambda v: v)
def test_load_model_outputs_equal_source(tmp_path, spec, fmt):
    src = randomised(spec, seed=1)
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    write_checkpoint(src.state_dict(), path, fmt)
    model = load_model(spec, path)
    assert not model.training
    x = torch.randn(4, *REGISTRY[spec].input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = src(x), model(x)
        assert not torch.equal(build_model(spec).eval()(x), expected)  # the weights do matter
    assert torch.equal(got, expected)


def test_load_model_accepts_str_path(tmp_path):
    src = randomised("digits-cnn")
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = load_model("digits-cnn", str(tmp_path / "w.pt"))
    assert torch.equal(model.fc.weight, src.fc.weight)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_checkpoint_raises(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(QpipeError, match="could not be read"):
        load_model("digits-cnn", path)


def test_truncated_checkpoint_raises(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(randomised("digits-cnn").state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(QpipeError, match="could not be read"):
        load_model("digits-cnn", path)


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(QpipeError, match="does not exist"):
        load_model("digits-cnn", tmp_path / "nope.pth")


class Payload:
    """Unpickling this calls open(marker, "w"): arbitrary code would run with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_object_is_not_executed(tmp_path):
    # the payload is live: a plain torch.load does create its marker file
    live = tmp_path / "live.pth"
    torch.save({"fc.weight": Payload(tmp_path / "live_marker")}, live)
    torch.load(live, weights_only=False)["fc.weight"].close()
    assert (tmp_path / "live_marker").exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Payload(marker)}, path)
    with pytest.raises(QpipeError, match="could not be read"):
        load_model("digits-cnn", path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [
    pytest.param({"epoch": 3, "lr": 0.1}, id="no_tensors"),
    pytest.param([torch.zeros(2)], id="list"),
    pytest.param(torch.zeros(3), id="bare_tensor"),
])
def test_checkpoint_without_state_dict_raises(tmp_path, content):
    torch.save(content, tmp_path / "w.pth")
    with pytest.raises(QpipeError, match="state dict of tensors"):
        load_model("digits-cnn", tmp_path / "w.pth")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("key,bad", [
    ("layer2.0.conv1.weight", float("nan")),
    ("bn1.running_var", float("inf")),
    ("fc.bias", float("-inf")),
], ids=["nan_conv_weight", "inf_running_var", "neg_inf_fc_bias"])
def test_non_finite_weight_raises_naming_the_tensor(tmp_path, fmt, key, bad):
    sd = randomised("digits-cnn").state_dict()
    sd[key].view(-1)[1] = bad
    path = tmp_path / f"w.{fmt}"
    write_checkpoint(sd, path, fmt)
    with pytest.raises(QpipeError, match=rf"{key}.*1 NaN/Inf"):
        load_model("digits-cnn", path)


def test_wrong_shape_raises(tmp_path):
    from qpipe.models.resnet import digits_cnn

    torch.save(digits_cnn(num_classes=5).state_dict(), tmp_path / "w.pth")
    with pytest.raises(QpipeError, match=r"fc.weight has shape \(5, 32\), the model expects \(10, 32\)"):
        load_model("digits-cnn", tmp_path / "w.pth")


def test_missing_key_raises(tmp_path):
    sd = randomised("digits-cnn").state_dict()
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(QpipeError, match=r"first missing key 'fc.bias' \(1 missing, 0 unexpected\)"):
        load_model("digits-cnn", tmp_path / "w.pth")


def test_unexpected_key_raises(tmp_path):
    sd = randomised("digits-cnn").state_dict()
    sd["head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(QpipeError, match=r"first unexpected key 'head.weight' \(0 missing, 1 unexpected\)"):
        load_model("digits-cnn", tmp_path / "w.pth")


def test_checkpoint_of_another_model_raises(tmp_path):
    save_file(randomised("resnet20").state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(QpipeError, match="does not match the model"):
        load_model("digits-cnn", tmp_path / "w.safetensors")


# ---------------------------------------------------------------------------------------------- user models

USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    CONSTANT = 3

    def make():
        torch.manual_seed(123)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Dropout(0.5))

    def not_a_module():
        return 42

    def raises():
        raise ValueError("bad config")
""")


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(USER_MODULE)
    return path


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """tmp_path/qpipe_test_userpkg/nets.py on sys.path; the imported modules are forgotten afterwards."""
    pkg = tmp_path / "qpipe_test_userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_MODULE)
    (pkg / "broken.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "qpipe_test_userpkg"
    for name in [m for m in sys.modules if m.startswith("qpipe_test_userpkg")]:
        del sys.modules[name]


def check_user_model(model: nn.Module):
    assert isinstance(model, nn.Sequential)
    assert not model.training  # eval mode: Dropout is off, outputs are repeatable
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        assert torch.equal(model(x), model(x))


def test_user_model_from_file(user_file):
    check_user_model(load_model(f"{user_file}:make"))


def test_user_model_from_package(user_package):
    check_user_model(load_model(f"{user_package}.nets:make"))


def test_user_model_from_file_with_weights(tmp_path, user_file):
    torch.manual_seed(5)
    src = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Dropout(0.5)).eval()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = load_model(f"{user_file}:make", tmp_path / "w.pth")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


@pytest.mark.parametrize("attr,match", [
    pytest.param("nope", "no callable 'nope'", id="missing_attribute"),
    pytest.param("CONSTANT", "no callable 'CONSTANT'", id="not_callable"),
    pytest.param("not_a_module", "returned int, not a torch.nn.Module", id="returns_int"),
    pytest.param("raises", "ValueError: bad config", id="callable_raises"),
])
@pytest.mark.parametrize("where", ["file", "package"])
def test_bad_user_callable_raises(user_file, user_package, where, attr, match):
    target = str(user_file) if where == "file" else f"{user_package}.nets"
    with pytest.raises(QpipeError, match=match):
        load_model(f"{target}:{attr}")


@pytest.mark.parametrize("spec,match", [
    pytest.param("resnet19", "neither a registry name", id="no_colon"),
    pytest.param("my_model.py", "neither a registry name", id="file_without_callable"),
    pytest.param(":make", "neither a registry name", id="empty_target"),
    pytest.param("{tmp}/missing.py:make", "does not exist", id="missing_file"),
    pytest.param("{tmp}/syntax.py:make", "could not import", id="syntax_error_file"),
    pytest.param("{tmp}/broken.py:make", "could not import .*RuntimeError: at import", id="file_raises_on_import"),
    pytest.param("qpipe_no_such_package_xyz.nets:make", "could not import module", id="missing_package"),
])
def test_bad_model_spec_raises(tmp_path, spec, match):
    (tmp_path / "syntax.py").write_text("def make(:\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('at import')\n")
    with pytest.raises(QpipeError, match=match):
        load_model(spec.replace("{tmp}", str(tmp_path)))


def test_package_module_raising_on_import_raises_qpipe_error(user_package):
    with pytest.raises(QpipeError, match="RuntimeError"):
        load_model(f"{user_package}.broken:make")
