"""Shared test helpers: the in-process CLI runner, the one-line error check, the digits test split, CIFAR-format
files, the user-model specs, and the tolerances the tests share (each with the reason for its value).

Imported as ``from helpers import ...``: tests/ is on sys.path through the rootdir conftest.py (pytest's default
``prepend`` import mode), for the test files in tests/ and in its sub-folders alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]                  # the repository: recipes/, recipes/sweeps/
USER_MODELS = Path(__file__).parent / "models" / "user_models.py"

# ---------------------------------------------------------------------------------------------- tolerances
# onnxruntime against the PyTorch quantized model (the parity numbers evaluate writes, and qpipe check gates)

QDQ_PARITY_STEPS = 2
"""Largest |onnxruntime - torch| logit difference of a QDQ graph, in output quantization steps: qpipe check's own
gate (runtime/check.py). Q/DQ requantisation and torch's fake quantisation round a few ties differently, and a
one-step difference inside the network can grow to two at the output."""

ONE_STEP = 1
"""The same difference where only the output quantizer can round a tie differently: the graph as written (no
optimised kernels), the exact u8 x u8 kernel, 4-bit activations clipped to their grid, APoT QAT graphs."""

PARITY_TOP1 = 0.995
"""Top-1 agreement of onnxruntime with the PyTorch quantized model: qpipe check's floor; on the 450 digits test
images at most 2 predictions may differ (the rounding ties above, where two logits are within a step)."""

ONE_POINT = 0.01
"""A top-1 drop of "within one point of FP32" (the integer-only ViT ops, AdderQuant at 4 bits)."""

FLOAT64_TOL = 1e-12
"""PyTorch against the NumPy reference, both in float64: the same formula, only the order of the sums differs."""


# ---------------------------------------------------------------------------------------------- the CLI

def run_cli(capsys, *args):
    """``qpipe ARGS`` in this process: (exit code, stdout, stderr)."""
    from qpipe.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    """Exit code 2 and exactly one line on stderr, ``error: ...``, naming every needle; no traceback."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def assert_ok(code, err=""):
    """A command that finished: main() exits with 0 or None."""
    assert code in (0, None), err


# ---------------------------------------------------------------------------------------------- data and models

def digits_test_split():
    """The whole digits test split (450 images) as two tensors, x and y."""
    import torch

    from qpipe.data import load_data

    batches = list(load_data("digits").batches("test", 512))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def user_model(name: str) -> str:
    """The model spec (``file.py:callable``) of one of the user-written models in tests/models/user_models.py."""
    return f"{USER_MODELS}:{name}"


def cifar_records(n: int, seed: int) -> np.ndarray:
    """n records in the CIFAR-10 binary format: label byte, then 1024 R, 1024 G, 1024 B bytes (row-major 32x32)."""
    rng = np.random.default_rng(seed)
    rec = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
    rec[:, 0] = rng.integers(0, 10, n)
    return rec


def write_cifar(root, n_train=(5, 3), n_test=4):
    """ROOT/cifar-10-batches-bin/ with data_batch_<i>.bin (n_train[i] random records) and test_batch.bin;
    returns (that folder, the training records, the test records)."""
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    train = [cifar_records(n, seed=i) for i, n in enumerate(n_train)]
    for i, rec in enumerate(train):
        rec.tofile(d / f"data_batch_{i + 1}.bin")
    test = cifar_records(n_test, seed=99)
    test.tofile(d / "test_batch.bin")
    return d, np.concatenate(train), test
