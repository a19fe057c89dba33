"""Vision Transformers: torchvision-compatible ViT-B/16 keys and checkpoints, an fx-traceable graph with explicit
attention ops, the one-line key-mismatch error, and the shipped digits ViT."""

import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch import fx, nn

from qpipe.data import load_data
from qpipe.models import REGISTRY, ROOT, load_model
from qpipe.models.resnet import resnet18
from qpipe.models.vit import digits_vit, vit_b_16
from qpipe.pipeline.train import accuracy

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def vit_b():
    torch.manual_seed(0)
    return vit_b_16().eval()


def torchvision_vit_b_16_keys() -> dict[str, tuple[int, ...]]:
    """torchvision.models.vit_b_16().state_dict(): names, order and shapes (torchvision/models/vision_transformer.py:
    own parameter class_token first, then conv_proj, encoder (pos_embedding, layers, ln), heads)."""
    d, mlp, n_tokens = 768, 3072, (224 // 16) ** 2 + 1
    keys = {"class_token": (1, 1, d), "conv_proj.weight": (d, 3, 16, 16), "conv_proj.bias": (d,),
            "encoder.pos_embedding": (1, n_tokens, d)}
    for i in range(12):
        p = f"encoder.layers.encoder_layer_{i}"
        keys.update({
            f"{p}.ln_1.weight": (d,), f"{p}.ln_1.bias": (d,),
            f"{p}.self_attention.in_proj_weight": (3 * d, d), f"{p}.self_attention.in_proj_bias": (3 * d,),
            f"{p}.self_attention.out_proj.weight": (d, d), f"{p}.self_attention.out_proj.bias": (d,),
            f"{p}.ln_2.weight": (d,), f"{p}.ln_2.bias": (d,),
            f"{p}.mlp.0.weight": (mlp, d), f"{p}.mlp.0.bias": (mlp,),
            f"{p}.mlp.3.weight": (d, mlp), f"{p}.mlp.3.bias": (d,),
        })
    keys.update({"encoder.ln.weight": (d,), "encoder.ln.bias": (d,),
                 "heads.head.weight": (1000, d), "heads.head.bias": (1000,)})
    return keys


def test_vit_b_16_state_dict_matches_torchvision(vit_b):
    sd = vit_b.state_dict()
    expected = torchvision_vit_b_16_keys()
    assert len(expected) == 152
    assert list(sd) == list(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # spot checks written out by hand
    assert sd["encoder.layers.encoder_layer_11.self_attention.in_proj_weight"].shape == (2304, 768)
    assert sd["encoder.layers.encoder_layer_0.self_attention.in_proj_bias"].shape == (2304,)
    assert sd["encoder.pos_embedding"].shape == (1, 197, 768)
    assert sd["class_token"].shape == (1, 1, 768)
    assert not any("in_proj.weight" in k for k in sd)
    assert sum(p.numel() for p in vit_b.parameters()) == 86_567_656  # torchvision's vit_b_16
    # the quantizer still sees a Linear
    assert isinstance(vit_b.encoder.layers.encoder_layer_0.self_attention.in_proj, nn.Linear)


def test_vit_b_16_torchvision_layout_checkpoint_round_trips(tmp_path, vit_b):
    path = tmp_path / "vit_b_16.pth"
    torch.save(vit_b.state_dict(), path)
    model = load_model("vit_b_16", path)  # strict: every key and shape must match
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = vit_b(x), model(x)
    assert expected.shape == (1, 1000)
    assert torch.equal(got, expected)


def test_digits_vit_traces_with_explicit_attention_ops():
    torch.manual_seed(0)
    model = digits_vit().eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    kinds = Counter(type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module")
    assert kinds["Softmax"] == 4 and kinds["GELU"] == 4 and kinds["LayerNorm"] == 9
    assert kinds["Linear"] == 4 * 4 + 1 and kinds["Conv2d"] == 1
    assert "MultiheadAttention" not in kinds
    matmuls, block = Counter(), None
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target.startswith("encoder.layers."):
            block = n.target.split(".")[2]
        if n.op == "call_function" and n.target is torch.matmul:
            matmuls[block] += 1
    assert matmuls == {f"encoder_layer_{i}": 2 for i in range(4)}
    assert not any(n.op == "call_function" and "scaled_dot_product" in str(n.target) for n in gm.graph.nodes)


def test_checkpoint_of_another_model_is_one_line_error(tmp_path):
    torch.save(resnet18().state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "qpipe", "calibrate", "--model", "vit_b_16", "--weights",
                        str(tmp_path / "resnet18.pth"), "--data", "synthetic:3x224x224:4", "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in r.stderr
    assert "does not match the model vit_b_16" in line
    assert "first missing key 'class_token'" in line and "first unexpected key 'conv1.weight'" in line
    assert "(152 missing, 122 unexpected)" in line
    assert not out.exists()


def test_shipped_digits_vit_checkpoint_scores():
    assert (ROOT / REGISTRY["digits-vit"].checkpoint).is_file()
    model = load_model("digits-vit")
    assert not model.training
    assert accuracy(model, load_data("digits")) >= 0.95
