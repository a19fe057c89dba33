"""The command line: bad input gives one clear line on stderr and exit code 2, and leaves nothing half-written;
a user's own model (file.py:callable + --weights + npz data) runs through calibrate -> export -> evaluate."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import QDQ_PARITY_STEPS, assert_ok, assert_one_line_error, run_cli

USER_MODEL_PARITY_TOP1 = 0.99  # 96 images: 95 of 96 is 0.9896, so every prediction must agree


BAD_CALIBRATE = [
    pytest.param(["--model", "nosuch-net"], "nosuch-net", id="unknown-model"),
    pytest.param(["--recipe", "nosuch-recipe"], "nosuch-recipe", id="unknown-recipe"),
    pytest.param(["--set", "weights.colour=red"], "weights.colour", id="unknown-recipe-key"),
    pytest.param(["--set", "weights.bits=9"], "outside 2..8", id="bits-9"),
    pytest.param(["--set", "weights.bits=1"], "outside 2..8", id="bits-1"),
    pytest.param(["--set", "activations.bits=12"], "outside 2..8", id="act-bits-12"),
    pytest.param(["--set", "weights.observer=magic"], "weights.observer", id="unknown-observer"),
    pytest.param(["--weights", "/nonexistent/w.pt"], "does not exist", id="missing-checkpoint"),
    pytest.param(["--data", "npz:/nonexistent/d.npz"], "does not exist", id="missing-data"),
    pytest.param(["--data", "imagenet"], "unknown data spec", id="bad-data-spec"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_CALIBRATE)
def test_calibrate_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, extra, needle):
    out = tmp_path / "out"
    opts = {"--model": "digits-cnn", "--data": "digits", "--recipe": "w8a8", "--out": str(out)}
    opts.update(zip(extra[::2], extra[1::2], strict=True))  # the bad value replaces the good one
    argv = ["calibrate"] + [x for kv in opts.items() for x in kv]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _checkpoint(tmp_path, name, mutate):
    from qpipe.models import load_model

    sd = load_model("digits-cnn").state_dict()
    mutate(sd)
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_corrupt_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04 not a checkpoint " * 10)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "calibrate", "--model", "digits-cnn", "--weights", str(bad), "--out", str(out))
    assert_one_line_error(code, err, "could not be read")
    assert not out.exists()


def test_nan_weights(capsys, tmp_path):
    path = _checkpoint(tmp_path, "nan.pt", lambda sd: sd["layer2.0.conv1.weight"].view(-1)[3].fill_(float("nan")))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "calibrate", "--model", "digits-cnn", "--weights", str(path), "--out", str(out))
    assert_one_line_error(code, err, "layer2.0.conv1.weight", "NaN")
    assert not out.exists()


def test_empty_dataset(capsys, tmp_path):
    data = tmp_path / "empty.npz"
    np.savez(data, x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros((0,), np.int64))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "calibrate", "--model", "digits-cnn", "--data", f"npz:{data}", "--out", str(out))
    assert_one_line_error(code, err, "empty")
    assert not out.exists()


def test_output_folder_that_exists_is_left_alone(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "calibrate", "--model", "digits-cnn", "--out", str(out))
    assert_one_line_error(code, err, "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_paths(capsys, tmp_path):
    for argv in (["export", str(tmp_path / "nope")], ["evaluate", str(tmp_path / "nope")],
                 ["check", str(tmp_path / "nope")], ["evaluate", str(tmp_path / "m.onnx")]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "does not exist")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_so(capsys, tmp_path, cnn_w8a8_64_qdq):
    code, _, err = run_cli(capsys, "calibrate", "--model", "digits-cnn", "--device", "cuda", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "cuda")
    code, _, err = run_cli(capsys, "evaluate", str(cnn_w8a8_64_qdq.path), "--device", "cuda", "--no-latency")
    assert_one_line_error(code, err, "cuda")


def test_unknown_option_is_one_line(capsys):
    code, _, err = run_cli(capsys, "export", "x", "--colour", "red")
    assert_one_line_error(code, err, "--colour")


def test_corrupt_onnx(capsys, tmp_path, artifacts, cnn_w8a8_64_qdq):
    copy = artifacts.copy(cnn_w8a8_64_qdq, tmp_path / "copy")
    (copy / "model.qdq.onnx").write_bytes(b"garbage" * 100)
    code, _, err = run_cli(capsys, "evaluate", str(copy), "--no-latency")
    assert_one_line_error(code, err, "model.qdq.onnx")
    assert not (copy / "metrics.json").exists()
    (copy / "graph.onnx").write_bytes(b"garbage" * 100)
    before = (copy / "model.qdq.onnx").read_bytes()
    code, _, err = run_cli(capsys, "export", str(copy))
    assert_one_line_error(code, err, "graph.onnx")
    assert (copy / "model.qdq.onnx").read_bytes() == before
    assert not [p for p in copy.iterdir() if p.name.endswith(".tmp")]


def test_check_reports_failures_with_exit_1(capsys, tmp_path, artifacts, cnn_w8a8_64_qdq):
    copy = artifacts.copy(cnn_w8a8_64_qdq, tmp_path / "copy")
    code, out, _ = run_cli(capsys, "check", str(copy))
    assert code == 1 and "FAIL  metrics metrics-ort-qdq.json" in out  # not evaluated yet
    code, out, _ = run_cli(capsys, "evaluate", str(copy), "--no-latency")
    assert_ok(code)
    exp = tmp_path / "exp.json"
    exp.write_text(json.dumps({"floors": {"accuracy.top1": 0.999}}))
    code, out, _ = run_cli(capsys, "check", str(copy), "--expect", str(exp))
    assert code == 1 and "FAIL  accuracy.top1 >= 0.999" in out
    exp.write_text(json.dumps({"floors": {"accuracy.top1": 0.9}}))
    code, out, _ = run_cli(capsys, "check", str(copy), "--expect", str(exp))
    assert code == 0, out


USER_MODEL = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.body = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = F.relu(self.bn(self.stem(x)))
            x = F.relu(self.body(x) + x)
            return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def build():
        return Net()
""")


def test_user_model_file_with_weights_and_npz_data(tmp_path):
    (tmp_path / "mynet.py").write_text(USER_MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        import mynet
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    net = mynet.build().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), tmp_path / "mynet.pt")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 3, 12, 12)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()  # labels the float model gets right
    np.savez(tmp_path / "data.npz", x=x, y=y)
    art = tmp_path / "art"
    q = [sys.executable, "-m", "qpipe"]
    common = dict(capture_output=True, text=True, cwd=tmp_path, timeout=300)
    r = subprocess.run(q + ["calibrate", "--model", "mynet.py:build", "--weights", "mynet.pt", "--data",
                            "npz:data.npz", "--recipe", "w8a8", "--out", str(art)], **common)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(q + ["export", str(art)], **common)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(q + ["evaluate", str(art), "--backend", "ort", "--batch-size", "32"], **common)
    assert r.returncode == 0, r.stderr
    m = json.loads((art / "metrics.json").read_text())
    assert m["accuracy"]["n"] == 96 and m["provider"] == "CPUExecutionProvider"
    assert m["accuracy"]["top1"] >= 0.9          # the quantized model keeps the float model's answers
    assert m["parity"]["top1_agreement"] >= USER_MODEL_PARITY_TOP1
    assert m["parity"]["max_abs_diff_steps"] <= QDQ_PARITY_STEPS
    q = json.loads((art / "qparams.json").read_text())
    assert {k for k, v in q["tensors"].items() if v["kind"] == "weight"} == {"stem.weight", "body.weight", "head.weight"}


FAULTS = """
import resource, sys, torch
from qpipe.cli import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print(-1); raise SystemExit
x = torch.randn(4, 32, 112, 112)                   # 6.4 MB: an early depthwise unit of a 224 x 224 CNN
w = torch.randn(32, 1, 3, 3, requires_grad=True)
def step():                                        # what each reconstruction iteration does
    y = torch.nn.functional.conv2d(x, w, padding=1, groups=32)
    ((y - x) ** 2).mean().backward()
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_the_cli_reuses_freed_activation_memory_instead_of_faulting_in_fresh_pages():
    """The CLI's allocator setting: ten forward/backward steps of a depthwise conv on 6.4 MB activations take
    a few thousand page faults; with glibc's defaults freed blocks go back to the kernel and each step faults
    its memory in again (117 000 faults here; 400 000 a second in EfficientNet-Lite0's AdaRound, 47 % of its
    CPU time in the kernel)."""
    import subprocess
    import sys

    faults = {how: int(subprocess.run([sys.executable, "-c", FAULTS, how], capture_output=True, text=True,
                                      check=True).stdout) for how in ("default", "keep")}
    if faults["keep"] < 0:
        pytest.skip("not glibc")
    assert faults["keep"] * 5 < faults["default"], faults
