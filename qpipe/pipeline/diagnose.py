"""``qpipe diagnose DIR``: which layer breaks accuracy. Per quantized layer, on calibration images:

- ``weight_sqnr_db``: the layer's integer weights against its float weights;
- ``alone_sqnr_db``: the model's logits with only this layer quantized (its weights and the quantizer that feeds
  it, everything else float) against the float logits: how sensitive the network is to this layer;
- ``cumulative_sqnr_db``: the layer's output in the fully quantized model against the float model's: the drift
  accumulated along the network up to it.

Writes ``diagnosis.json`` and ``diagnosis.png`` (bar charts, one panel each) into the artifact and returns the
record; the worst layers (lowest ``alone_sqnr_db``) come with a suggestion.
"""

from __future__ import annotations

import io
import json

import torch

from qpipe import inputs
from qpipe.artifact import Artifact
from qpipe.errors import QpipeError

from .qmodel import mode, only_quantize, sqnr_db

WORST = 5


def _suggest(name: str, bits: int, first: str, last: str) -> str:
    if bits < 8 and name == first:
        return "keep the first layer at 8 bits (--set weights.first_bits=8)"
    if bits < 8 and name == last:
        return "keep the last layer at 8 bits (--set weights.last_bits=8)"
    if bits < 8:
        return (f"weights at {bits} bits: try a clipping estimator (weights.observer=mse or lp_norm), "
                "per-channel scales or AdaRound, or more bits")
    return "8-bit already: look at its input activations (activations.observer=mse or percentile)"


def diagnose(artifact: str | Artifact, data=None, images: int = 256, batch_size: int = 128, model=None,
             write: bool = True) -> dict:
    from qpipe.data import as_source

    from .calibrate import load_quantized, load_quantized_from

    art = artifact if isinstance(artifact, Artifact) else Artifact(artifact)
    q = art.record
    layers = q.quantized_layers()
    if not layers:
        raise QpipeError(f"{art.path} has no quantized layers to diagnose")
    gm = load_quantized_from(model, art) if model is not None else load_quantized(art)
    data = data or art.manifest.get("data")
    source = as_source(data, q.input_shape)
    xs = [x for x, _ in source.batches("calib", batch_size, images)]
    if not xs:
        raise QpipeError(f"data {data}: no calibration images")
    x = inputs.cat(xs)

    def first_output() -> torch.Tensor:   # the model's (first) output, whatever it returns
        return inputs.outputs(inputs.call(gm, x))[0].double()

    outputs: dict[str, dict[str, torch.Tensor]] = {"float": {}, "quant": {}}
    which = {"now": "float"}
    hooks = [gm.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: outputs[which["now"]].__setitem__(n, o.detach().double())) for n in layers]
    with torch.no_grad():
        with mode(gm, "float"):
            ref = first_output()
        which["now"] = "quant"
        full = first_output()
        for h in hooks:
            h.remove()
        alone = {}
        for n in layers:
            names = {n} | ({q.layers[n].input} if q.layers[n].input else set())
            with only_quantize(gm, names):
                alone[n] = sqnr_db(ref, first_output())
    rows = []
    for n in layers:
        info = q.layers[n]
        rows.append({"layer": n, "op": info.op, "weight_bits": q.weight_bits(n),
                     "weight_sqnr_db": info.sqnr_db, "alone_sqnr_db": alone[n],
                     "cumulative_sqnr_db": sqnr_db(outputs["float"][n], outputs["quant"][n])})
    finite = lambda v: v if v != float("inf") else 1e9
    worst = sorted(rows, key=lambda r: finite(r["alone_sqnr_db"]))[:WORST]
    for r in worst:
        r["suggestion"] = _suggest(r["layer"], r["weight_bits"], layers[0], layers[-1])
    result = {"images": inputs.batch_len(x), "data": data if isinstance(data, str) else "<in-memory>",
              "model_sqnr_db": sqnr_db(ref, full), "layers": rows,
              "worst": [{"layer": r["layer"], "alone_sqnr_db": r["alone_sqnr_db"], "suggestion": r["suggestion"]}
                        for r in worst]}
    if write:
        art.add_file("diagnosis.json", json.dumps(result, indent=2) + "\n")
        art.add_file("diagnosis.png", plot(result, art.path.name))
    return result


def plot(result: dict, title: str) -> bytes:
    """Three bar charts (weights, alone, cumulative SQNR per layer) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layers"]
    names = [r["layer"] for r in rows]
    worst = {w["layer"] for w in result["worst"][:1]}
    panels = [("weight_sqnr_db", "weights vs float"), ("alone_sqnr_db", "logits, this layer quantized alone"),
              ("cumulative_sqnr_db", "layer output, whole model quantized")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.45 * len(names) + 2), 8.5), sharex=True)
    for ax, (key, label) in zip(axes, panels, strict=True):
        vals = [min(r[key], 99.0) if r[key] is not None else 0.0 for r in rows]
        ax.bar(range(len(names)), vals, color=["tab:red" if n in worst else "tab:blue" for n in names])
        ax.set_ylabel("SQNR (dB)")
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
    fig.suptitle(f"{title}: per-layer SQNR (red: the most sensitive layer)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def format_worst(result: dict) -> str:
    lines = [f"model logits SQNR {result['model_sqnr_db']:.1f} dB on {result['images']} calibration images; "
             "most sensitive layers (logits SQNR with only that layer quantized):"]
    for w in result["worst"]:
        lines.append(f"  {w['layer']:40s} {w['alone_sqnr_db']:7.1f} dB  -> {w['suggestion']}")
    return "\n".join(lines)
