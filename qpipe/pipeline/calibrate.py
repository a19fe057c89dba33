"""``qpipe calibrate``: fold BN, observe ranges, round weights, and write the artifact folder."""

from __future__ import annotations

import copy
import io
import platform
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import fx, nn

import qpipe
from qpipe import inputs
from qpipe.artifact import Artifact, hash_files, staging_dir, write_atomic, write_json
from qpipe.errors import QpipeError
from qpipe.onnx_names import TORCHSCRIPT_OPSET as OPSET_GRAPH
from qpipe.recipe import Recipe, dump_recipe, load_recipe
from qpipe.record import Encoding, IntGraph, LayerRecord, QuantRecord, TensorKind, TensorSpec

from .qmodel import (
    ActQuant,
    Prepared,
    calibrate_activations,
    embedding_bits,
    fit_bias_scales,
    freeze_int_ops,
    mode,
    prepare,
    quantize_biases,
    quantize_weights,
    weight_sqnr,
)


def _output_quantizers(p: Prepared) -> list[str | None]:
    """For each flat output of the Q-model, the quantizer whose grid it lies on (None: a float output)."""
    out = next(n for n in p.gm.graph.nodes if n.op == "output")
    found = []
    for arg in torch.utils._pytree.tree_leaves(out.args[0]):
        q = None
        if isinstance(arg, fx.Node) and arg.op == "call_module" and isinstance(p.gm.get_submodule(arg.target), ActQuant):
            q = p.gm.get_submodule(arg.target).qname
        found.append(q)
    return found


def io_specs(p: Prepared, example: dict[str, torch.Tensor], named: bool) -> tuple[tuple[TensorSpec, ...],
                                                                                  tuple[TensorSpec, ...]]:
    """The Q-model's graph inputs and outputs, by name, with the shapes ``example`` gives and their dynamic axes.

    A model captured by torch.export keeps its argument and output names (``input_ids``, ``last_hidden_state``)
    and every axis export found symbolic; a one-tensor model keeps the names ``input`` / ``logits`` with a dynamic
    batch axis."""
    meta = p.gm.meta
    exported = "qpipe_outputs" in meta
    with torch.no_grad(), mode(p.gm, "float"):
        outs = inputs.outputs(p.gm(**example))
    if exported:
        dyn = meta["qpipe_dynamic"]
        in_names, in_axes = list(example), dyn["inputs"]
        out_names, out_axes = meta["qpipe_outputs"], dyn["outputs"]
    else:
        in_names = list(example) if named else [inputs.SINGLE]
        in_axes = [{0: "batch"}] * len(in_names)
        out_names = ["logits"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
        out_axes = [{0: "batch"}] * len(outs)
    quantizers = _output_quantizers(p)
    ins = tuple(TensorSpec(n, _np_dtype(t), tuple(t.shape), dict(a))
                for n, t, a in zip(in_names, example.values(), in_axes, strict=True))
    outs = tuple(TensorSpec(n, _np_dtype(t), tuple(t.shape), dict(a), q)
                 for n, t, a, q in zip(out_names, outs, out_axes, quantizers, strict=True))
    return ins, outs


def _np_dtype(t: torch.Tensor) -> str:
    """``float32``, ``int64``, ...: the name NumPy and torch share."""
    return str(t.dtype).removeprefix("torch.")


def qparams_record(p: Prepared, recipe: Recipe, weight_sqnr_db: dict[str, float], input_shape,
                   bias_fit: dict[str, tuple[int, ...]] | None = None) -> QuantRecord:
    """The typed record of a frozen Q-model: every quantized tensor's encoding and every layer's input."""
    tensors, layers = {}, {}
    w = recipe.weights
    observer = w.observer + ("+output_clip" if w.rounding == "adaround" and recipe.adaround.clip_search else "")
    for name in p.layers:
        m = p.gm.get_submodule(name)
        if m.weight_int is not None:
            per_channel = m.weight_scale.ndim == 1
            tensors[f"{name}.weight"] = Encoding(
                TensorKind.WEIGHT, p.weight_bits[name], signed=True, symmetric=w.symmetric,
                axis=0 if per_channel else None, scale=_numbers(m.weight_scale, float),
                zero_point=_numbers(m.weight_zero_point, int), rounding=w.rounding, observer=observer,
                shape=tuple(m.weight.shape))
        if m.bias_int is not None:
            tensors[f"{name}.bias"] = Encoding(TensorKind.BIAS, 32, signed=True, symmetric=True, axis=0,
                                               scale=_numbers(m.bias_scale, float), zero_point=0, rounding="nearest")
        layers[name] = LayerRecord("Conv" if m.weight.ndim == 4 else "Gemm", p.layer_input[name],
                                   weight_sqnr_db.get(name) if m.weight_int is not None else None,
                                   (bias_fit or {}).get(name, ()))
    for name in p.embeddings:
        m = p.gm.get_submodule(name)
        tensors[f"{name}.weight"] = Encoding(
            TensorKind.WEIGHT, int(embedding_bits(recipe)), signed=True, symmetric=True, axis=0,
            scale=_numbers(m.weight_scale, float), zero_point=_numbers(m.weight_zero_point, int), rounding="nearest",
            observer="absmax", shape=tuple(m.weight.shape))
    for name in p.act:
        aq = p.gm.get_submodule(name)
        if aq.source is None:
            tensors[name] = Encoding(TensorKind.ACTIVATION, aq.spec.bits, aq.spec.signed, aq.spec.symmetric, None,
                                     float(aq.scale), int(aq.zero_point), observer=recipe.activations.observer)
    return QuantRecord(tuple(input_shape), _output_quantizers(p)[0], tensors, layers)


def _numbers(t: torch.Tensor, kind):
    """A tensor's values as a tuple (1-D) or one number (0-D), as the record keeps them."""
    return tuple(kind(v) for v in t.tolist()) if t.ndim else kind(t.item())


def export_graph(p: Prepared, record: QuantRecord) -> bytes:
    """The float graph with Mark nodes, via the TorchScript exporter (it keeps parameter names), with the record's
    input and output names and dynamic axes."""
    buf = io.BytesIO()
    ins, outs = record.input_specs(), record.output_specs()
    dynamic = {t.name: dict(t.dynamic) for t in (*ins, *outs) if t.dynamic}
    with warnings.catch_warnings(), mode(p.gm, "mark"), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(p.gm, inputs.dummy_inputs(ins), buf, input_names=[t.name for t in ins],
                          output_names=[t.name for t in outs], dynamic_axes=dynamic,
                          opset_version=OPSET_GRAPH, dynamo=False, do_constant_folding=True)
    return buf.getvalue()


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"qpipe": qpipe.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def calibrate(model: nn.Module | str, data, recipe: Recipe | str = "w8a8", out: str | Path | None = None, *,
              weights: str | None = None, overrides=(), seed: int | None = None, device: str = "cpu",
              command: str | None = None, progress: bool = True) -> Artifact:
    """Quantize ``model`` on ``data``'s calibration split by ``recipe`` and write the artifact ``out``."""
    from qpipe.data import as_source
    from qpipe.models import load_model

    if not isinstance(recipe, Recipe) or overrides or seed is not None:
        recipe = load_recipe(recipe, overrides, seed)
    if out is None:
        raise QpipeError("calibrate needs an output folder (--out)")
    if Path(out).exists():
        raise QpipeError(f"output folder {out} already exists; choose another --out or remove it")
    model_spec = model if isinstance(model, str) else f"<in-memory {type(model).__name__}>"
    if isinstance(model, str):
        model = load_model(model, weights)
    from .train import check_device

    dev = check_device(device)
    source = as_source(data)
    from qpipe import dist

    from .capture import axis_limits, example_from

    rank, _ = dist.init(device)
    torch.manual_seed(recipe.seed)
    first = next(iter(source.batches("calib", recipe.calibration.batch_size, recipe.calibration.images)), None)
    if first is None:
        raise QpipeError("calibration data is empty")
    example = example_from(model, first[0])
    limits = axis_limits(model)
    inputs.check_lengths(limits, example, {k: {1: "sequence"} for k, v in example.items() if not v.is_floating_point()})
    p = prepare(model, recipe, example)
    try:
        ins, outs = io_specs(p, example, inputs.is_named(first[0]))
    except Exception as e:  # the data does not fit the model: say so in one line
        raise QpipeError(f"the model cannot run on the data ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
                         if str(e).strip() else f"the model cannot run on the data ({type(e).__name__})") from e
    dynamic = {t.name: t.dynamic for t in ins}
    p.gm.to(dev)

    def batches():
        from tqdm import tqdm

        it = source.batches("calib", recipe.calibration.batch_size, recipe.calibration.images)
        for x, y in tqdm(it, desc="calibrate", unit="batch", disable=None if progress else True, leave=False):
            inputs.check_lengths(limits, x, dynamic)
            yield inputs.to(x, dev), y

    weight_info = quantize_weights(p, recipe)
    adders = None
    if p.adders:  # AdderQuant: ranges, groups and codes of the adder layers, BN re-estimated, then activations
        from . import adderquant

        if dist.active():
            raise QpipeError("adder-layer calibration runs in one process; run it without torchrun")
        adderquant.observe_ranges(p, batches())
        adders = adderquant.freeze_adders(p, recipe)
        if recipe.adder.bn_reestimate:
            adderquant.reestimate_bn(p, batches())
    n = calibrate_activations(p, recipe, batches()) if p.act else 0
    bias_fit = fit_bias_scales(p, recipe)   # before any learned rounding: nothing fails after the expensive step
    if rank != 0:  # under torchrun the scales are now those of a single process; rank 0 finishes and writes
        dist.barrier()
        return Artifact(out)
    report = None
    workdir = Path(str(out) + ".partial")  # AdaRound's finished units, kept until the artifact is whole
    if recipe.weights.rounding == "adaround":
        from .adaround import reconstruct, run_key

        xs = [x for x, _ in source.batches("calib", recipe.calibration.batch_size, recipe.calibration.images)]
        images = inputs.cat(xs)
        key = run_key({"recipe": recipe.to_dict(), "model": model_spec, "weights": weights,
                       "data": data if isinstance(data, str) else None, "n": inputs.batch_len(images),
                       "images": sum(float(t.double().sum()) for _, t in inputs.items(images))})
        report = reconstruct(p, recipe, images, workdir, key, device=device, progress=progress,
                             cache_mb=recipe.adaround.cache_mb)
        n = n or inputs.batch_len(images)
        weight_info = {name: weight_sqnr(p.gm.get_submodule(name)) for name in weight_info}
    for name, channels in fit_bias_scales(p, recipe).items():   # learned input steps (LSQ) moved s_in
        bias_fit[name] = tuple(sorted({*bias_fit.get(name, ()), *channels}))
    for name in bias_fit:
        weight_info[name] = weight_sqnr(p.gm.get_submodule(name))
    quantize_biases(p)
    int_ops = freeze_int_ops(p)
    p.gm.cpu()
    shape = tuple(source.input_shape)
    record = qparams_record(p, recipe, weight_info, shape, bias_fit).replace(
        intops=int_ops, adders=adders, adaround=tuple(report) if report is not None else None, inputs=ins,
        outputs=outs, axis_limits=limits)
    write_artifact(out, p, recipe, record, shape, model_spec=model_spec, weights=weights, data=data, images=n,
                   command=command or "qpipe.calibrate()")
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    dist.barrier()
    return Artifact(out)


def write_artifact(out: str | Path, p: Prepared, recipe: Recipe, record: QuantRecord, shape, *, model_spec, weights,
                   data, images: int, command: str, int_graph_reason: str | None = None,
                   extra_files: dict[str, bytes] | None = None) -> None:
    """Export the marked float graph of the frozen Q-model ``p`` and write the artifact folder ``out`` (staged,
    renamed). The record says whether the integer-only graph exists: where the PyTorch integer model can be
    built, ``qpipe export --format int`` writes the same computation as ONNX; where not, the reason."""
    graph = export_graph(p, record)
    if int_graph_reason is None and not (recipe.quantizes_activations and recipe.quantizes_weights):
        int_graph_reason = "the integer-only graph needs quantized weights and activations"
    if int_graph_reason is None:
        from .intmodel import to_int

        try:
            to_int(p.gm, inputs.dummy_inputs(record.input_specs()))
        except QpipeError as e:  # recorded: qpipe export --format int says why
            int_graph_reason = str(e)
    record = record.replace(int_graph=IntGraph(int_graph_reason is None, int_graph_reason))
    with staging_dir(out) as tmp:
        write_atomic(tmp / "recipe.yaml", dump_recipe(recipe))
        state = {k: v.detach().contiguous() for k, v in p.gm.state_dict().items()}
        save_file(state, str(tmp / "quantized.safetensors"))
        write_json(tmp / "qparams.json", record.to_json())
        write_atomic(tmp / "graph.onnx", graph)
        files = ["recipe.yaml", "quantized.safetensors", "qparams.json", "graph.onnx"]
        for name, blob in (extra_files or {}).items():
            write_atomic(tmp / name, blob)
            files.append(name)
        weights_path = str(Path(weights).resolve()) if weights else None
        if weights is None and isinstance(model_spec, str):
            from qpipe.models import REGISTRY, ROOT

            info = REGISTRY.get(model_spec)
            if info and info.checkpoint and (ROOT / info.checkpoint).is_file():
                weights_path = str(ROOT / info.checkpoint)
        spec = model_spec
        if isinstance(spec, str) and spec.startswith("hf:"):   # the folder, wherever qpipe runs from later
            spec = f"hf:{Path(spec[3:]).resolve()}"
        elif isinstance(spec, str) and ".py:" in spec:
            f, _, c = spec.rpartition(":")
            spec = f"{Path(f).resolve()}:{c}"
        manifest = {
            "model": spec, "weights": weights_path, "data": data if isinstance(data, str) else repr(data),
            "recipe": recipe.name, "seed": recipe.seed, "calibration_images": images, "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "commands": [{"command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}],
            "files": hash_files(tmp, files),
        }
        write_json(tmp / "manifest.json", manifest)


def load_quantized(artifact: Artifact | str | Path) -> fx.GraphModule:
    """Rebuild the frozen PyTorch Q-model of an artifact (structure from the model spec, state from the file)."""
    from qpipe.models import build_model

    art = artifact if isinstance(artifact, Artifact) else Artifact(artifact)
    spec = art.manifest.get("model", "")
    if spec.startswith("<in-memory"):
        raise QpipeError(f"{art.path} was calibrated from an in-memory model; pass the model to evaluate it in torch")
    return load_quantized_from(build_model(spec), art)


def load_int_model(artifact: Artifact | str | Path, model: nn.Module | None = None) -> fx.GraphModule:
    """The PyTorch integer simulation of an artifact: the model that ``model.int.onnx`` was exported from."""
    from .intmodel import to_int

    art = artifact if isinstance(artifact, Artifact) else Artifact(artifact)
    q = load_quantized_from(copy.deepcopy(model), art) if model is not None else load_quantized(art)
    return to_int(q, inputs.dummy_inputs(art.record.input_specs()))


def load_quantized_from(model: nn.Module, art: Artifact) -> fx.GraphModule:
    from .capture import example_from

    recipe = art.recipe
    specs = art.record.input_specs()
    dummies = inputs.dummy_inputs(specs)   # captured again as calibrate captured it (torch.export needs inputs)
    single = len(specs) == 1 and specs[0].name == inputs.SINGLE
    example = example_from(model, dummies[0]) if single else dict(zip([s.name for s in specs], dummies, strict=True))
    p = prepare(model, recipe, example)
    try:
        state = load_file(str(art.file("quantized.safetensors")))
    except Exception as e:
        raise QpipeError(f"{art.file('quantized.safetensors')} is not a readable safetensors file") from e
    missing, unexpected = p.gm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise QpipeError(f"{art.path}: quantized.safetensors does not match the model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return p.gm.eval()
