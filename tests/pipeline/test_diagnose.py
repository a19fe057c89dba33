"""qpipe diagnose: per-layer SQNR in diagnosis.json and a PNG; a deliberately bad layer is reported worst."""

import json

import pytest
from helpers import ROOT, assert_one_line_error, run_cli

import qpipe
from qpipe.pipeline.diagnose import diagnose

HARMLESS_SQNR_DB = 25  # 8-bit: every layer quantized alone keeps the logits' SQNR above this (harmless)


@pytest.mark.parametrize("bad", [None, "first"], ids=["w4a8", "w4a8-first-layer-2-bit"])
def test_diagnose_writes_json_and_png_and_finds_the_bad_layer(tmp_path, capsys, bad):
    overrides = ["calibration.images=128"] + (["weights.first_bits=2"] if bad else [])
    art = qpipe.calibrate("digits-cnn", "digits", "w4a8", out=tmp_path / "a", progress=False, overrides=overrides)
    code, out, _ = run_cli(capsys, "diagnose", str(art.path), "--images", "128")
    assert code == 0
    res = json.loads(art.file("diagnosis.json").read_text())
    assert art.file("diagnosis.png").read_bytes()[:4] == b"\x89PNG"
    assert len(res["layers"]) == 10 and len(res["worst"]) == 5
    for r in res["layers"]:
        assert r["alone_sqnr_db"] > 0 and r["cumulative_sqnr_db"] > 0
    # quantizing everything costs more than quantizing any one layer
    assert res["model_sqnr_db"] < min(r["alone_sqnr_db"] for r in res["layers"])
    if bad:
        assert res["worst"][0]["layer"] == "conv1" and "first_bits=8" in res["worst"][0]["suggestion"]
        assert "conv1" in out.splitlines()[1]
        assert any(r["layer"] == "conv1" and r["weight_bits"] == 2 for r in res["layers"])
    # hashes recorded: qpipe check still passes its manifest gate
    assert all(r.ok for r in qpipe.check(art) if r.name == "manifest hashes")


def test_every_8_bit_layer_alone_is_harmless(cnn_w8a8_64_qdq):
    res = diagnose(cnn_w8a8_64_qdq, images=64, write=False)  # writes nothing: the shared artifact will do
    assert all(r["alone_sqnr_db"] > HARMLESS_SQNR_DB for r in res["layers"])


@pytest.mark.parametrize(("args", "needle"), [
    (["diagnose", "/nonexistent/artifact"], "does not exist"),
    (["sweep", "/nonexistent/grid.yaml"], "does not exist"),
    (["sweep", "recipes/sweeps/vit.yaml", "--jobs", "0", "--out", "OUT"], "--jobs must be at least 1"),
], ids=["diagnose-missing", "sweep-missing", "sweep-jobs-0"])
def test_new_commands_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    args = [a.replace("OUT", str(tmp_path / "o")).replace("recipes/", f"{ROOT}/recipes/") for a in args]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()
