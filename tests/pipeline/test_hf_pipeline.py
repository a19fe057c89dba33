"""Hugging Face ``transformers`` models as a user brings them, through the CLI: a local model folder
(``hf:DIR``) and an npz of named inputs; inspect -> calibrate -> export (QDQ and integer-only) -> evaluate in
onnxruntime at batch sizes and sequence lengths calibration never saw -> check. Small configs, random weights."""

import itertools
import json

import numpy as np
import onnx
import pytest
from helpers import assert_ok, assert_one_line_error, run_cli

from qpipe.reference.intops import TABLE_FUNCTIONS, activation_table, dyadic, embedding_table

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

VOCAB, MAX_POSITIONS = 120, 40
CALIB_SHAPE, TEST_SHAPE = (24, 10), (10, 17)   # (samples, sequence length): the test length is new to the model
COSINE_W8A8 = 0.99
"""Mean per-sample cosine of W8A8 outputs (QDQ, integer-only) to the FP32 graph on these random-weight models
(measured 0.9995-0.9999 for last_hidden_state); what a user of a text encoder would notice first."""


def build(name, attn):
    torch.manual_seed(0)
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=MAX_POSITIONS,
                                      attn_implementation=attn)
        return transformers.BertModel(cfg)
    if name == "roberta":   # positions counted from the ids (cumsum past the padding id), after it
        cfg = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=MAX_POSITIONS + 2,
                                         attn_implementation=attn)
        return transformers.RobertaModel(cfg)
    if name == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=MAX_POSITIONS, attn_implementation=attn)
        return transformers.DistilBertModel(cfg)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, attn_implementation=attn)
    return transformers.ViTModel(cfg)


def tokens(n, length, seed, pad_every=3):
    g = np.random.default_rng(seed)
    mask = np.ones((n, length), np.int64)
    mask[::pad_every, length // 2:] = 0   # padded sentences
    return g.integers(1, VOCAB, (n, length)), mask


def write_data(path, name, calib=CALIB_SHAPE, test=TEST_SHAPE, **extra):
    if name == "vit":
        g = np.random.default_rng(0)
        arrays = {"pixel_values_train": g.standard_normal((calib[0], 3, 32, 32)).astype(np.float32),
                  "pixel_values_test": g.standard_normal((test[0], 3, 32, 32)).astype(np.float32)}
    else:
        ids, mask = tokens(*calib, 0)
        ids_t, mask_t = tokens(*test, 1)
        arrays = {"input_ids_train": ids, "attention_mask_train": mask, "input_ids_test": ids_t,
                  "attention_mask_test": mask_t}
    arrays.update(extra)
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.fixture
def model_dir(tmp_path):
    def make(name, attn="sdpa"):
        folder = tmp_path / f"{name}-{attn}"
        transformers.logging.disable_progress_bar()   # the user's own step, not qpipe's stderr
        try:
            build(name, attn).save_pretrained(folder)
        finally:
            transformers.logging.enable_progress_bar()
        return f"hf:{folder}"
    return make


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["bert", "distilbert", "roberta", "vit"])
def test_transformers_model_runs_unchanged_from_folder_to_exact_integer_graph(name, attn, model_dir, tmp_path, capsys):
    model = model_dir(name, attn)
    data = write_data(tmp_path / "data.npz", name)
    out = tmp_path / "art"
    code, text, err = run_cli(capsys, "inspect", "--model", model, "--recipe", "w8a8-int")
    assert_ok(code, err)
    assert "embedding" in text or name == "vit"
    for args in (["calibrate", "--model", model, "--data", data, "--recipe", "w8a8-int", "--out", str(out)],
                 ["export", str(out), "--format", "qdq"], ["export", str(out), "--format", "int"],
                 ["evaluate", str(out), "--format", "qdq", "--no-latency"],
                 ["evaluate", str(out), "--format", "int", "--no-latency"]):
        code, _, err = run_cli(capsys, *args)
        assert_ok(code, err)
    qdq = json.loads((out / "metrics-ort-qdq.json").read_text())
    integer = json.loads((out / "metrics-ort-int.json").read_text())
    assert "accuracy" not in qdq   # no labels: compared with the FP32 graph instead
    assert qdq["fidelity"]["n"] == TEST_SHAPE[0]
    assert qdq["fidelity"]["outputs"]["last_hidden_state"]["cosine_mean"] > COSINE_W8A8
    assert integer["fidelity"]["outputs"]["last_hidden_state"]["cosine_mean"] > COSINE_W8A8
    for key in ("parity", "parity_optimized"):   # the integer graph equals the PyTorch integer model
        assert integer[key]["max_abs_diff"] == 0, key
    for fmt in ("qdq", "int"):   # the model's own names, batch and sequence dynamic
        m = onnx.load(str(out / f"model.{fmt}.onnx"))
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
        outs = [o.name for o in m.graph.output]
        assert outs[0] == "last_hidden_state"
        if name == "vit":
            assert dims == {"pixel_values": ["batch", 3, 32, 32]}
        else:
            assert dims["input_ids"] == ["batch", "sequence"] and dims["attention_mask"] == ["batch", "sequence"]


def _consumers(m):
    out = {}
    for n in m.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


@pytest.mark.parametrize("bits,dtype", [(8, onnx.TensorProto.INT8), (4, onnx.TensorProto.INT4)], ids=["int8", "int4"])
def test_token_ids_reach_an_integer_embedding_table_unquantized(bits, dtype, model_dir, tmp_path, capsys):
    model = model_dir("bert")
    out = tmp_path / "art"
    code, _, err = run_cli(capsys, "calibrate", "--model", model, "--data", write_data(tmp_path / "d.npz", "bert"),
                           "--recipe", "w8a8-int", "--out", str(out), "--set", f"weights.embedding_bits={bits}")
    assert_ok(code, err)
    for fmt in ("qdq", "int"):
        assert_ok(*run_cli(capsys, "export", str(out), "--format", fmt)[::2])
    m = onnx.load(str(out / "model.qdq.onnx"))
    users = _consumers(m)
    gathers = [n for n in users["input_ids"] if n.op_type == "Gather"]
    # the ids go straight to the table (and to Shape, for the positions): no Q/DQ, no Cast
    assert len(gathers) == 1 and {n.op_type for n in users["input_ids"]} <= {"Gather", "Shape"}
    table = next(n for n in m.graph.node if n.output[0] == gathers[0].input[0])
    assert table.op_type == "DequantizeLinear" and table.attribute[0].i == 0   # per row
    init = next(t for t in m.graph.initializer if t.name == table.input[0])
    assert init.data_type == dtype and list(init.dims) == [VOCAB, 32]   # 1/4 (1/8) of the float table
    rec = json.loads((out / "qparams.json").read_text())["tensors"]["embeddings.word_embeddings.weight"]
    assert rec["bits"] == bits and rec["axis"] == 0 and len(rec["scale"]) == VOCAB
    mi = onnx.load(str(out / "model.int.onnx"))
    users = _consumers(mi)
    gathers = [n for n in users["input_ids"] if n.op_type == "Gather"]
    assert len(gathers) == 1 and {n.op_type for n in users["input_ids"]} <= {"Gather", "Shape"}
    table = next(t for t in mi.graph.initializer if t.name == gathers[0].input[0])   # on the 8-bit output grid,
    assert table.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)         # stored in 8 bits


def test_check_gates_an_embedding_model_on_cosine_sqnr_and_steps(model_dir, tmp_path, capsys):
    model = model_dir("bert")
    out = tmp_path / "art"
    data = write_data(tmp_path / "d.npz", "bert")
    for args in (["calibrate", "--model", model, "--data", data, "--recipe", "w8a8", "--out", str(out)],
                 ["export", str(out), "--format", "qdq"], ["evaluate", str(out), "--no-latency"]):
        assert_ok(*run_cli(capsys, *args)[::2])
    metrics = json.loads((out / "metrics.json").read_text())
    fid = metrics["fidelity"]
    assert set(fid["outputs"]) == {"last_hidden_state", "pooler_output"}
    assert fid["sqnr_db"] > 20 and fid["cosine_min"] <= fid["cosine_mean"] <= 1
    assert metrics["parity"]["max_abs_diff_steps"] is not None and "top1_agreement" not in metrics["parity"]
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps({"floors": {"fidelity.cosine_mean": COSINE_W8A8, "fidelity.sqnr_db": 20}}))
    code, text, err = run_cli(capsys, "check", str(out), "--expect", str(expect))
    assert code == 0, text
    assert "fidelity.cosine_mean >= 0.99" in text
    # the transformer's parity ceiling: Q/DQ ties plus onnxruntime's own float-order distance on the same inputs
    ort_self = metrics["ort_optimized_vs_validation"]["max_abs_diff_steps"]
    for key in ("parity", "parity_optimized"):
        assert f"{key}.max_abs_diff_steps <= {2 + ort_self:g}" in text
    assert metrics["parity"]["tokens"] == "kept by the attention mask"
    expect.write_text(json.dumps({"floors": {"fidelity.cosine_mean": 1.000001}}))
    code, text, _ = run_cli(capsys, "check", str(out), "--expect", str(expect))
    assert code == 1 and "FAIL  fidelity.cosine_mean" in text


@pytest.mark.parametrize("case,needles", [
    ("misnamed", ["'ids' is not an argument of BertModel", "input_ids", "attention_mask"]),
    ("float_ids", ["'input_ids' holds floats"]),
    ("too_long", ["sequence length 50", "position table holds 40"]),
])
def test_bad_inputs_are_one_line_and_write_nothing(case, needles, model_dir, tmp_path, capsys):
    model = model_dir("bert")
    ids, mask = tokens(*CALIB_SHAPE, 0)
    path = tmp_path / "d.npz"
    if case == "misnamed":
        np.savez(path, ids=ids, attention_mask=mask)
    elif case == "float_ids":
        np.savez(path, input_ids=ids.astype(np.float32), attention_mask=mask)
    else:
        np.savez(path, input_ids=np.ones((4, 50), np.int64))
    out = tmp_path / "art"
    code, _, err = run_cli(capsys, "calibrate", "--model", model, "--data", f"npz:{path}", "--out", str(out))
    assert_one_line_error(code, err, *needles)
    assert not out.exists() and not list(tmp_path.glob(".art*"))


def test_evaluate_refuses_test_data_that_does_not_fit(model_dir, tmp_path, capsys):
    model = model_dir("bert")
    out = tmp_path / "art"
    assert_ok(*run_cli(capsys, "calibrate", "--model", model, "--data", write_data(tmp_path / "d.npz", "bert"),
                       "--out", str(out))[::2])
    assert_ok(*run_cli(capsys, "export", str(out))[::2])
    long_ids = write_data(tmp_path / "long.npz", "bert", test=(4, 60))
    code, _, err = run_cli(capsys, "evaluate", str(out), "--data", long_ids)
    assert_one_line_error(code, err, "sequence length 60", "position table holds 40")
    ids, mask = tokens(4, 10, 2)
    np.savez(tmp_path / "float.npz", input_ids=ids.astype(np.float64), attention_mask=mask)
    code, _, err = run_cli(capsys, "evaluate", str(out), "--data", f"npz:{tmp_path / 'float.npz'}")
    assert_one_line_error(code, err, "'input_ids' holds floats")
    np.savez(tmp_path / "other.npz", token_ids=ids, attention_mask=mask)
    code, _, err = run_cli(capsys, "evaluate", str(out), "--data", f"npz:{tmp_path / 'other.npz'}")
    assert_one_line_error(code, err, "input 'input_ids' is not in the data", "token_ids, attention_mask")
    assert not (out / "metrics.json").exists()


# ---------------------------------------------------------------- the tables' NumPy reference

def test_embedding_table_is_the_row_requantised_to_the_output_grid():
    g = np.random.default_rng(0)
    w = g.integers(-127, 128, (50, 16))
    s_row = g.uniform(1e-3, 2e-2, 50)
    s_out, z = 0.013, 3
    t = embedding_table(w, s_row, s_out, z, -128, 127)
    exact = np.clip(w * s_row[:, None] / s_out + z, -128, 127)
    assert np.abs(t - exact).max() <= 0.5 + 1e-6   # round to nearest; the dyadic multiplier is exact to 2^-31
    d = dyadic(s_row[7] / s_out)   # one row by hand: floor((w m + 2^(k-1)) / 2^k) + z
    assert t[7].tolist() == [min(127, max(-128, (int(v) * d.m[0] + (1 << (d.k[0] - 1)) >> d.k[0]) + z)) for v in w[7]]


@pytest.mark.parametrize("fn", sorted(TABLE_FUNCTIONS))
def test_activation_table_is_the_float_function_rounded_to_the_output_grid(fn):
    alpha = {"elu": 1.0, "leaky_relu": 0.01}.get(fn, 0.0)
    s_in, z_in, s_out, z_out = 0.05, 128, 0.02, 100
    t = activation_table(fn, alpha, s_in, z_in, 0, 255, s_out, z_out, 0, 255)
    x = torch.arange(0, 256, dtype=torch.float64)
    gelu = torch.nn.functional.gelu
    ref = {"gelu": gelu, "gelu_tanh": lambda v: gelu(v, approximate="tanh"), "tanh": torch.tanh, "sigmoid": torch.sigmoid, "hardswish": torch.nn.functional.hardswish,
           "hardsigmoid": torch.nn.functional.hardsigmoid, "elu": torch.nn.functional.elu,
           "leaky_relu": torch.nn.functional.leaky_relu}[fn]((x - z_in) * s_in).numpy()
    want = np.clip(ref / s_out + z_out, 0, 255)
    assert t.shape == (256,) and np.abs(t - want).max() <= 0.5 + 1e-9   # half an output step from torch's f


def test_exclude_keeps_a_submodule_of_an_exported_model_float(tmp_path):
    import qpipe

    model = build("bert", "sdpa").eval()
    ids, mask = tokens(*CALIB_SHAPE, 0)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    out = tmp_path / "art"
    art = qpipe.calibrate(model, batches, "w8a8-int", out, overrides=["exclude=[encoder.layer.1.attention]"],
                          progress=False)
    rec = art.record
    inside = [n for n in rec.layers if n.startswith("encoder.layer.1.attention.")]
    assert not inside and "encoder.layer.1.intermediate.dense" in rec.layers   # float inside, quantized after
    assert "encoder.layer.1.attention" in rec.int_graph.reason   # the integer graph says why it has none
    qpipe.export(out, "qdq")
    m = qpipe.evaluate(out, data=batches, model=model, latency=False, progress=False)
    assert m["fidelity"]["cosine_mean"] > COSINE_W8A8 and m["parity"]["max_abs_diff_steps"] <= 2


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"], ids=["erf", "tanh"])
def test_float_gelu_runs_in_the_integer_graph_as_its_exact_table(act, tmp_path):
    """ops.gelu: fp keeps the model's own GELU (erf or tanh): float between Q/DQ, a table in the integer graph."""
    import qpipe

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=MAX_POSITIONS, hidden_act=act)
    model = transformers.BertModel(cfg).eval()
    ids, mask = tokens(*CALIB_SHAPE, 0)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    out = tmp_path / "art"
    qpipe.calibrate(model, batches, "w8a8-int", out, overrides=["ops.gelu=fp"], progress=False)
    qpipe.export(out, "int")
    m = onnx.load(str(out / "model.int.onnx"))
    assert not any(n.op_type == "IntGELU" for n in m.graph.node)
    tables = [n for n in m.graph.node if n.op_type == "Gather" and "Gelu_table" in n.input[0]]
    assert len(tables) == 1
    metrics = qpipe.evaluate(out, data=batches, model=model, format="int", latency=False, progress=False)
    assert metrics["parity"]["max_abs_diff"] == 0 and metrics["parity_optimized"]["max_abs_diff"] == 0


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_block_reconstruction_cuts_a_masked_transformer_into_its_halves(name, model_dir, tmp_path):
    """The attention mask (and the sequence length reshapes read) reach every layer from the inputs; as edges
    they would leave no cut point, and BRECQ's block and encoder units would be the whole model. They are side
    values: blocks are the attention and MLP halves, encoders the numbered layers, and each block computes from
    its input and side values exactly what the model computes there."""
    from qpipe.models import load_model
    from qpipe.pipeline import adaround as ada
    from qpipe.pipeline.capture import example_from
    from qpipe.pipeline.qmodel import mode, prepare, quantize_weights
    from qpipe.recipe import load_recipe

    model = load_model(model_dir(name))
    ids, mask = tokens(6, 10, 0)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    r = load_recipe("w4a8-brecq")
    p = prepare(model, r, example_from(model, batch))
    quantize_weights(p, r)
    block = ada.find_units(p, "block", set())
    encoder = ada.find_units(p, "encoder", set())
    layers = 2   # num_hidden_layers of build()
    assert [len(u.layers) for u in block][: 2 * layers] == [4, 2] * layers   # q, k, v, out | fc1, fc2
    assert [len(u.layers) for u in encoder][:layers] == [6] * layers
    assert block[2].sides and set(block[2].sides) <= ada.side_nodes(p.gm, set())   # the mask, the lengths
    assert len(ada.find_units(p, "block", None)) < 2 * layers   # the old view, every input a stream: few cuts

    stream = ada.Stream(p.gm, batch, "float", 6, 1 << 30, tmp_path, "cpu", "in")
    for u in block[:3]:
        seg = ada.segment_module(p.gm, u.start, u.nodes, u.sides)
        sides = ada.SideValues(p.gm, u.sides, stream, "cpu")
        with torch.no_grad(), mode(p.gm, "float"):
            got = seg(stream.value(u.start).data, *sides.get(torch.arange(6)))
            want = ada.prefix_module(p.gm, u.end)(*batch.values())
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    stream.close()


def test_brecq_learns_encoder_units_on_a_masked_transformer(model_dir, tmp_path):
    """w4a8-brecq at encoder granularity on a BERT with padded sentences: one unit per layer (and the pooler),
    each reconstructing its float output better than nearest rounding, and the exported graph still matches."""
    import qpipe

    data = write_data(tmp_path / "d.npz", "bert")
    art = qpipe.calibrate(model_dir("bert"), data, "w4a8-brecq", tmp_path / "a", progress=False,
                          overrides=["adaround.granularity=encoder", "adaround.iters=200", "adaround.lr=0.01",
                                     "calibration.images=24"])
    report = art.qparams["adaround"]
    assert [u["unit"] for u in report][:2] == ["encoder.layer.0", "encoder.layer.1"]
    assert all(u["mse_after"] < u["mse_before"] for u in report[:2]), report


@pytest.mark.parametrize("attn,observer", [("eager", "minmax"), ("sdpa", "mse")])
def test_activation_ranges_come_from_real_tokens_not_padding(attn, observer, model_dir, tmp_path, capsys):
    """What sits in the padded positions of a batch never reaches a real token's output, so it must not move an
    activation range: the same sentences with other ids in their padding calibrate to the same scales (every
    quantizer). Before, padding took part in every range, however much of a batch it was."""
    model = model_dir("bert", attn)
    ids, mask = tokens(*CALIB_SHAPE, 0)
    other = np.where(mask == 1, ids, np.random.default_rng(5).integers(1, VOCAB, ids.shape))
    assert (other != ids).any()
    scales = {}
    for tag, arr in (("ids", ids), ("other", other)):
        path = tmp_path / f"{tag}.npz"
        np.savez(path, input_ids_train=arr, attention_mask_train=mask, input_ids_test=arr, attention_mask_test=mask)
        out = tmp_path / tag
        assert_ok(*run_cli(capsys, "calibrate", "--model", model, "--data", f"npz:{path}", "--recipe", "w8a8",
                           "--set", f"activations.observer={observer}", "--out", str(out))[::2])
        q = json.loads((out / "qparams.json").read_text())["tensors"]
        scales[tag] = {k: (v["scale"], v["zero_point"]) for k, v in q.items() if v["kind"] == "activation"}
    assert len(scales["ids"]) > 10
    assert scales["ids"] == scales["other"]


def test_clip_search_on_a_padded_transformer_clips_by_real_tokens_only(model_dir, tmp_path):
    """``adaround.clip_search`` on a BERT with padded sentences: it moves weight scales off the MSE grid (the
    record says the observer ran with the search), and it looks only at real tokens: the same sentences with
    other ids in their padding choose the same clipping for every layer."""
    import qpipe

    model = model_dir("bert")
    ids, mask = tokens(*CALIB_SHAPE, 0)
    other = np.where(mask == 1, ids, np.random.default_rng(5).integers(1, VOCAB, ids.shape))
    sets = ["weights.observer=mse", "adaround.iters=5", "calibration.images=24"]
    scales = {}
    for tag, arr, search in (("plain", ids, "false"), ("ids", ids, "true"), ("other", other, "true")):
        path = tmp_path / f"{tag}.npz"
        np.savez(path, input_ids_train=arr, attention_mask_train=mask, input_ids_test=arr, attention_mask_test=mask)
        art = qpipe.calibrate(model, f"npz:{path}", "w4a8-adaround", tmp_path / tag, progress=False,
                              overrides=[*sets, f"adaround.clip_search={search}"])
        weights = {k: art.record.weight(k) for k in art.record.layers}   # the embedding tables stay on absmax
        assert {e.observer for e in weights.values()} == {"mse+output_clip" if search == "true" else "mse"}
        scales[tag] = {k: np.asarray(e.scale) for k, e in weights.items()}
    assert len(scales["ids"]) >= 12
    moved = [k for k in scales["ids"] if not np.allclose(scales["ids"][k], scales["plain"][k], rtol=1e-6)]
    assert len(moved) >= 3, "the search kept the MSE grid almost everywhere"
    assert all(np.array_equal(scales["ids"][k], scales["other"][k]) for k in scales["ids"])


@pytest.mark.parametrize("attn,recipe", [("eager", "w8a8"), ("sdpa", "w8a8"), ("sdpa", "w8a8-int")])
def test_a_padded_sentence_gives_what_it_gives_alone(attn, recipe, model_dir, tmp_path):
    """Batching with padding must not change a sentence's embedding: in the QDQ graph (float softmax, or the
    IntSoftmax op) and the integer-only graph, validation and optimised sessions, each real token's output
    equals that of the sentence run alone at its own length. Before, -inf from ``masked_fill(mask, -inf)`` was
    clamped to the lowest score on the grid, so padded keys took probability from the real ones (0.02 in
    last_hidden_state on this model)."""
    import qpipe
    from qpipe.runtime.session import make_session

    data = write_data(tmp_path / "d.npz", "bert")
    art = qpipe.calibrate(model_dir("bert", attn), data, recipe, tmp_path / "a", progress=False)
    files = ["model.qdq.onnx"] + (["model.int.onnx"] if recipe.endswith("-int") else [])
    for f in files:
        qpipe.export(art.path, format=f.split(".")[1])
    ids, mask = tokens(*TEST_SHAPE, 3)
    assert (mask == 0).any()
    for f, optimized in itertools.product(files, (False, True)):
        sess = make_session(tmp_path / "a" / f, optimized=optimized)
        batch = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        for i in np.flatnonzero(mask.sum(1) < mask.shape[1]):
            n = int(mask[i].sum())
            alone = sess.run(None, {"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]})[0]
            np.testing.assert_array_equal(batch[i, :n], alone[0])
