"""The ``qpipe`` command line: parses, calls the library, prints. Errors: one line on stderr, exit code 2."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from qpipe import flow
from qpipe.errors import QpipeError
from qpipe.record import TensorKind


def _command() -> str:
    return "qpipe " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qpipe")
def cli():
    """qpipe: quantize a trained PyTorch model, export it to ONNX and prove it in onnxruntime."""


@cli.command()
@click.option("--model", "model", required=True, help="Registry name (digits-cnn, resnet20, resnet18) or file.py:callable.")
@click.option("--data", default="digits", show_default=True, help="Data spec: digits, npz:FILE, cifar10:DIR, imagenet:DIR.")
@click.option("--out", required=True, type=click.Path(),
              help="Float: the checkpoint to write (.safetensors). --qat: the artifact folder to create.")
@click.option("--qat", type=click.Choice(["apot", "uniform"]), default=None,
              help="Quantization-aware fine-tuning with APoT or uniform levels and learned clipping.")
@click.option("--bits", type=int, default=None, help="--qat: weight and activation bits (APoT: 2..5).")
@click.option("--init", type=click.Path(), default=None,
              help="--qat: float checkpoint to start from (default: the model's shipped checkpoint).")
@click.option("--recipe", default=None, help="--qat: recipe name or YAML (default: {qat}-w{bits}a{bits}[-{model}]).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="--qat: override a recipe key.")
@click.option("--epochs", type=int, default=None, help="Float: default 40. --qat: overrides qat.epochs.")
@click.option("--lr", type=float, default=None, help="Float: default 3e-3 (AdamW). --qat: overrides qat.lr.")
@click.option("--batch-size", type=int, default=None, help="Float: default 64. --qat: overrides qat.batch_size.")
@click.option("--seed", type=int, default=None, help="Float: default 0. --qat: overrides the recipe's seed.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default=None,
              help="Float: adamw (one-cycle, default) or sgd (momentum 0.9, cosine; AdderNets).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def train(model, data, out, qat, bits, init, recipe, overrides, epochs, lr, batch_size, seed, optimizer, device):
    """Train a float model (the demo checkpoints in artifacts/models are made with this), or fine-tune one with
    quantization-aware training (--qat) into an artifact folder."""
    if qat is None and (bits is not None or init is not None or recipe is not None or overrides):
        raise QpipeError("--bits, --init, --recipe and --set are options of quantization-aware training: add --qat")
    if qat is not None and optimizer is not None:
        raise QpipeError("--optimizer is for float training; QAT takes SGD settings from the recipe's qat section")
    if qat is None:
        from qpipe.pipeline.train import train as run_train

        note = run_train(model, data, epochs, out, lr=lr, batch_size=batch_size, seed=seed, command=_command(),
                         optimizer=optimizer, device=device)
        click.echo(f"wrote {out}: test top-1 {100 * note['test_top1']:.2f}% ({note['epochs']} epochs, "
                   f"seed {note['seed']})")
        return
    from qpipe.pipeline.qat import train_qat

    over = list(overrides)
    over += [f"qat.epochs={epochs}"] if epochs is not None else []
    over += [f"qat.lr={lr}"] if lr is not None else []
    over += [f"qat.batch_size={batch_size}"] if batch_size is not None else []
    art = train_qat(model, data, out, method=qat, bits=bits, recipe=recipe, init=init, overrides=over, seed=seed,
                    command=_command(), device=device)
    q = art.record.qat
    last = q["history"][-1]
    click.echo(f"wrote {art.path}: {q['method']} QAT, {q['epochs']} epochs, final train loss {last['loss']:.4f}; "
               f"next: qpipe export {art.path} && qpipe evaluate {art.path} --backend ort")


@cli.command()
@click.option("--model", required=True, help="Registry name or path/to/file.py:callable or package.module:callable.")
@click.option("--recipe", default="w8a8", show_default=True, help="Recipe name in recipes/ or a YAML file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the points as JSON.")
def inspect(model, recipe, overrides, as_json):
    """List the quantization points graph capture finds: every layer, matmul, softmax, GELU, LayerNorm, residual
    add, concatenation and pooling, with its input/output quantizers and bits (no calibration)."""
    import json

    from qpipe.models import build_model
    from qpipe.pipeline.inspect import format_points, quantization_points
    from qpipe.recipe import load_recipe

    rows = quantization_points(build_model(model), load_recipe(recipe, overrides))
    click.echo(json.dumps(rows, indent=2) if as_json else format_points(rows))


def _calibrate_options(f):
    f = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)(f)
    f = click.option("--seed", type=int, default=None, help="Overrides the recipe's seed.")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a recipe key, e.g. --set weights.bits=4 (repeatable).")(f)
    f = click.option("--weights", type=click.Path(), default=None,
                     help="Checkpoint (.pt/.pth state dict or .safetensors); registry models default to the shipped one.")(f)
    return f


@cli.command()
@click.option("--model", required=True, help="Registry name or path/to/file.py:callable or package.module:callable.")
@click.option("--data", default="digits", show_default=True, help="Data spec (calibration uses its training data).")
@click.option("--recipe", default="w8a8", show_default=True, help="Recipe name in recipes/ or a YAML file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact folder to create (must not exist).")
@_calibrate_options
def calibrate(model, data, recipe, out, weights, overrides, seed, device):
    """Fold BN, estimate ranges, round weights and write the artifact folder."""
    from qpipe.pipeline.calibrate import calibrate as run

    art = run(model, data, recipe, out, weights=weights, overrides=overrides, seed=seed, device=device,
              command=_command())
    from qpipe import dist

    if dist.rank() != 0:
        return
    q = art.record
    n_w = sum(1 for t in q.tensors.values() if t.kind == TensorKind.WEIGHT)
    n_a = sum(1 for t in q.tensors.values() if t.kind == TensorKind.ACTIVATION)
    click.echo(f"wrote {art.path}: {n_w} quantized weight tensors, {n_a} activation quantizers")
    wide = sum(1 for t in q.tensors.values() if t.kind == TensorKind.ACTIVATION and t.bits > 8)
    if wide and art.recipe.activations.residual_bits is None:
        click.echo(f"residual stream at 16 bits ({wide} quantizers): the model has LayerNorm residual blocks; "
                   "--set activations.residual_bits=8 keeps it at 8")
    if q.adaround:
        click.echo(format_adaround(list(q.adaround)))


def format_adaround(report: list[dict]) -> str:
    """The per-unit AdaRound summary: reconstruction MSE before/after, share rounded away from nearest."""
    rows = [("unit", "layers", "MSE nearest", "MSE learned", "changed", "iters", "")]
    for u in report:
        rows.append((u["unit"], str(len(u["layers"])), f"{u['mse_before']:.4g}", f"{u['mse_after']:.4g}",
                     f"{100 * u['changed_from_nearest']:.1f}%", str(u["iters"]), "resumed" if u.get("resumed") else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["qdq", "fp32", "int", "all"]), default="qdq", show_default=True,
              help="qdq: Q/DQ graph with integer weights; int: integer-only graph (ConvInteger/MatMulInteger, "
                   "ai.qpipe ops); fp32: the float graph of the same model; all: every one the artifact allows.")
@click.option("--opset", type=int, default=21, show_default=True)
@click.option("--layout", type=click.Choice(["u8", "s8"]), default="u8", show_default=True,
              help="Activation container: uint8 (fastest in onnxruntime on x86) or int8.")
@click.option("--weight-layout", type=click.Choice(["auto", "portable", "int8"]), default="auto", show_default=True,
              help="int8: every weight as int8 (onnxruntime's fast u8 x s8 kernel; exact on CPUs with VNNI/AMX); "
                   "portable: int8 weights beyond +-64 as uint8+128 (the u8 x u8 kernel: exact on every CPU); "
                   "auto: int8 where this CPU has VNNI or AMX, portable elsewhere. qpipe check fails an int8 file "
                   "on a CPU that would saturate it.")
@click.option("--int4/--no-int4", default=True, show_default=True,
              help="Store <=4-bit conv weights as ONNX INT4 (smallest file) or in int8 (fuses into QLinearConv).")
def export(artifact, fmt, opset, layout, weight_layout, int4):
    """Write model.qdq.onnx, model.int.onnx and/or model.fp32.onnx into an artifact folder."""
    from qpipe.export import export as run

    for p in run(artifact, fmt, opset, layout, command=_command(), weight_layout=weight_layout, int4=int4):
        click.echo(f"wrote {p} ({p.stat().st_size / 1024:.1f} KiB)")


@cli.command()
@click.argument("target", type=click.Path())
@click.option("--backend", type=click.Choice(["ort", "torch"]), default="ort", show_default=True)
@click.option("--data", default=None, help="Data spec (default: the artifact's).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--latency/--no-latency", default=True, show_default=True)
@click.option("--limit", type=int, default=None, help="Evaluate only the first N test images.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
@click.option("--format", "fmt", type=click.Choice(["qdq", "int", "fp32"]), default=None,
              help="Which model of the artifact (default: the first exported of qdq, int, fp32). int: onnxruntime "
                   "on model.int.onnx against the PyTorch integer simulation (exact parity).")
@click.option("--parity/--no-parity", default=True, show_default=True,
              help="--no-parity: onnxruntime accuracy and latency from the ONNX file alone, without building the "
                   "PyTorch model to compare with.")
def evaluate(target, backend, data, device, batch_size, latency, limit, threads, fmt, parity):
    """Accuracy, latency and ORT-vs-PyTorch parity; writes metrics.json into the artifact."""
    from qpipe.runtime.evaluate import evaluate as run
    from qpipe.runtime.evaluate import format_table

    m = run(target, data, backend, device, batch_size, latency, limit, threads, command=_command(), format=fmt,
            parity=parity)
    from qpipe import dist

    if dist.rank() == 0:
        click.echo(format_table([{**m, "name": Path(target).name}]))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--expect", type=click.Path(), default=None, help="JSON with accuracy/parity floors and ceilings.")
def check(artifact, expect):
    """Gate an artifact: hashes, onnx.checker, op set, integer weights, parity, accuracy floors (exit 0 or 1)."""
    from qpipe.runtime.check import check as run
    from qpipe.runtime.check import format_results

    results = run(artifact, expect)
    click.echo(format_results(results))
    failed = [r for r in results if not r.ok]
    click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


@cli.command()
@click.argument("recipes", nargs=-1)
@click.option("--model", default=flow.DEFAULT_MODEL, show_default=True)
@click.option("--data", default=flow.DEFAULT_DATA, show_default=True)
@click.option("--weights", type=click.Path(), default=None)
@click.option("--out-root", type=click.Path(file_okay=False), default=flow.DEFAULT_OUT_ROOT, show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--expect-dir", type=click.Path(file_okay=False), default=flow.DEFAULT_EXPECT_DIR, show_default=True)
def run(recipes, model, data, weights, out_root, overrides, expect_dir):
    """Calibrate, export, evaluate (torch and ort) and check each recipe; print one comparison table.

    With no RECIPES: the bundled default, the demo CNN on digits as FP32, W8A8 and W4A8. Where the artifact
    has an integer-only graph (quantized weights and activations) it is exported and evaluated as well.
    """
    from qpipe.flow import run as run_flow
    from qpipe.runtime.check import format_results
    from qpipe.runtime.evaluate import format_table

    rows, failures = [], []
    for recipe in recipes or flow.DEFAULT_RECIPES:
        name = Path(recipe).stem
        out = Path(out_root) / name
        click.echo(f"== {name}: calibrate -> export -> evaluate -> check  ({out})", err=True)
        expect = Path(expect_dir) / f"{name}.json"
        res = run_flow(model, data, recipe, out, weights=weights, overrides=overrides, replace=True,
                       expect=expect if expect.is_file() else None, command=_command())
        rows += [{**m, "name": name} for m in res.metrics]
        click.echo(format_results(res.checks), err=True)
        if not res.ok:
            failures.append(name)
    click.echo(format_table(rows, title=f"{model} on {data} (test split; steps = ORT vs torch, validation/optimised)"))
    if failures:
        click.echo(f"error: qpipe check failed for {', '.join(failures)}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--data", default=None, help="Data spec (default: the artifact's; its calibration split is used).")
@click.option("--images", type=int, default=256, show_default=True)
def diagnose(artifact, data, images):
    """Per-layer SQNR (weights, the layer quantized alone, cumulative drift): diagnosis.json + diagnosis.png."""
    from qpipe.pipeline.diagnose import diagnose as run
    from qpipe.pipeline.diagnose import format_worst

    if images < 1:
        raise click.BadParameter(f"--images must be at least 1, got {images}")
    res = run(artifact, data, images=images)
    click.echo(format_worst(res))
    click.echo(f"wrote {Path(artifact) / 'diagnosis.json'} and {Path(artifact) / 'diagnosis.png'}")


@cli.command()
@click.argument("grid", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Results folder (default: artifacts/sweeps/<grid name>); rerunning continues where it stopped.")
@click.option("--jobs", type=int, default=1, show_default=True, help="Cells run at once, one process each.")
@click.option("--model", default=None, help="Override the grid's model.")
@click.option("--data", default=None, help="Override the grid's data spec.")
def sweep(grid, out, jobs, model, data):
    """Run a grid of recipes (calibrate -> export -> evaluate in onnxruntime) and write results.{csv,md,json}."""
    from qpipe.sweep import sweep as run

    out = out or str(Path("artifacts/sweeps") / Path(grid).stem)
    res = run(grid, out, jobs=jobs, model=model, data=data)
    click.echo(Path(out, "results.md").read_text())
    click.echo(f"{len(res['cells'])} cells ({res['reused']} reused, {res['failed']} failed); results in {out}")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc mallopt parameters
MMAP_THRESHOLD_MAX = 32 * 2**20                # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks up to 32 MiB for reuse instead of unmapping them: every AdaRound / QAT step
    allocates and frees the same activation-sized tensors, and with glibc's defaults each came back as fresh pages
    (EfficientNet-Lite0 AdaRound: 400 000 page faults a second, 47 % of the CPU time in the kernel). The process
    is qpipe's own here, so its allocator settings are too; False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


def main(argv=None) -> None:
    """Entry point: user errors print one line on stderr and exit 2 (QPIPE_DEBUG=1 shows tracebacks)."""
    debug = os.environ.get("QPIPE_DEBUG") == "1"
    keep_freed_memory()
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="qpipe")
        sys.exit(0)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        msg = e.format_message().replace("\n", " ")
        ctx = getattr(e, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        click.echo(f"error: {msg}{where}", err=True)
        sys.exit(2)
    except QpipeError as e:
        if debug:
            raise
        click.echo(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        sys.exit(2)
    except SystemExit:
        raise
    except Exception as e:
        if debug:
            raise
        click.echo(f"error: internal {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                   "(rerun with QPIPE_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
