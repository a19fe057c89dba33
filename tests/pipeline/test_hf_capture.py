"""Hugging Face ``transformers`` models as they ship, captured through torch.export: BERT, DistilBERT and ViT in
eager and sdpa attention, small configs with random weights."""

import operator

import pytest
import torch

from qpipe.pipeline.capture import capture
from qpipe.pipeline.inspect import quantization_points
from qpipe.pipeline.qmodel import ActQuant, QLinear, prepare
from qpipe.recipe import load_recipe

transformers = pytest.importorskip("transformers")

ATTENTION = ("eager", "sdpa")


def bert(attn):
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation=attn)
    return transformers.BertModel(cfg).eval()


def distilbert(attn):
    cfg = transformers.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                        max_position_embeddings=64, attn_implementation=attn)
    return transformers.DistilBertModel(cfg).eval()


def vit(attn):
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, attn_implementation=attn)
    return transformers.ViTModel(cfg).eval()


MODELS = {"bert": bert, "distilbert": distilbert, "vit": vit}


def other_inputs(name):
    """A batch size and sequence length that the capture's example (2 x 8) did not have, with padding."""
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(5, 3, 32, 32, generator=g)}
    mask = torch.ones(3, 23, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 4:] = 0
    return {"input_ids": torch.randint(0, 120, (3, 23), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("name", list(MODELS))
def test_capture_computes_the_model_at_new_shapes(name, attn):
    torch.manual_seed(0)
    model = MODELS[name](attn)
    gm = capture(model)
    x = other_inputs(name)
    with torch.no_grad():
        ref = model(**x)
        out = gm(*x.values())
    names = gm.meta["qpipe_outputs"]
    assert names[0] == "last_hidden_state"
    for value, key in zip(out, names, strict=True):
        # sdpa's fused kernel and its decomposition round differently in the last bits
        torch.testing.assert_close(value, ref[key], rtol=1e-5, atol=1e-5)
    kinds = {type(m).__name__ for _, m in gm.named_modules()}
    assert {"Linear", "LayerNorm", "Softmax", "GELU"} <= kinds   # sdpa decomposed: the softmax is a module
    targets = {str(n.target) for n in gm.graph.nodes}
    assert not any("scaled_dot_product" in t for t in targets)


@pytest.mark.parametrize("attn", ATTENTION)
def test_token_ids_are_never_quantized_and_every_linear_reads_a_quantized_input(attn):
    model = bert(attn)
    p = prepare(model, load_recipe("w8a8-int"))
    modules = dict(p.gm.named_modules())
    for ph in (n for n in p.gm.graph.nodes if n.op == "placeholder"):
        for user in ph.users:
            assert not (user.op == "call_module" and isinstance(modules[user.target], ActQuant)), ph.name
    gather = [n for n in p.gm.graph.nodes if n.op == "call_module" and n.target == "embeddings.word_embeddings"]
    assert gather and gather[0].args[0].name == "input_ids"   # the ids reach the embedding as they came
    rows = quantization_points(model, "w8a8-int")
    assert not [r["warning"] for r in rows if "warning" in r]
    ops = [r["op"] for r in rows]
    assert ops.count("IntSoftmax") == 2 and ops.count("IntLayerNorm") == 5 and ops.count("IntGELU") == 2


def _quantizer_after(p, node):
    (user,) = node.users
    return user, p.gm.get_submodule(user.target)


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_residual_stream_is_16_bit_and_a_post_ln_output_is_requantised_for_its_layer(name):
    """BERT (post-LN): a LayerNorm output is the residual stream and the FFN's input; the add reads it at 16 bits,
    the Linear at 8. ViT (pre-LN): LayerNorm outputs feed layers only and stay 8-bit; residual adds are 16-bit."""
    p = prepare(MODELS[name]("sdpa"), load_recipe("w8a8"))
    modules = dict(p.gm.named_modules())
    lns = [n for n in p.gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], torch.nn.LayerNorm)]
    adds = [n for n in p.gm.graph.nodes if n.op == "call_function" and n.target is operator.add
            and all(isinstance(a, torch.fx.Node) for a in n.args)]
    assert adds and all(_quantizer_after(p, a)[1].spec.bits == 16 for a in adds if len(a.users) == 1
                        and isinstance(modules.get(next(iter(a.users)).target), ActQuant))
    split = 0
    for ln in lns:
        q, aq = _quantizer_after(p, ln)
        readers = {type(modules.get(u.target)).__name__ if u.op == "call_module" else str(u.target) for u in q.users}
        if aq.spec.bits == 16:   # post-LN: the residual add reads it, an 8-bit quantizer feeds the layer
            eight = [u for u in q.users if u.op == "call_module" and isinstance(modules[u.target], ActQuant)]
            assert len(eight) == 1 and modules[eight[0].target].spec.bits == 8, readers
            assert all(isinstance(modules.get(u.target), QLinear) for u in eight[0].users)
            split += 1
        else:
            assert aq.spec.bits == 8
    # BERT: the embeddings' and both attention-output LayerNorms, and layer 0's output one (the last feeds no add)
    assert split == (4 if name == "bert" else 0)
