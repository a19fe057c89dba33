"""Model zoo and loaders: registry names, ``file.py:callable`` / ``package.module:callable`` user models,
and checkpoints read safely (``torch.load(weights_only=True)`` or safetensors)."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qpipe.errors import QpipeError

from .adder import digits_adder, resnet20_adder
from .resnet import digits_cnn, resnet18, resnet20
from .vit import digits_vit, vit_b_16

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ModelInfo:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]   # one image, C x H x W
    data: str                      # the data spec it was made for
    checkpoint: str | None         # shipped checkpoint, relative to the repository root


REGISTRY: dict[str, ModelInfo] = {
    "digits-cnn": ModelInfo(digits_cnn, (1, 8, 8), "digits", "artifacts/models/digits-cnn.safetensors"),
    "resnet20": ModelInfo(resnet20, (3, 32, 32), "cifar10", None),
    "resnet18": ModelInfo(resnet18, (3, 224, 224), "imagenet", None),
    "digits-vit": ModelInfo(digits_vit, (1, 8, 8), "digits", "artifacts/models/digits-vit.safetensors"),
    "vit_b_16": ModelInfo(vit_b_16, (3, 224, 224), "imagenet", None),
    "digits-adder": ModelInfo(digits_adder, (1, 8, 8), "digits", "artifacts/models/digits-adder.safetensors"),
    "resnet20-adder": ModelInfo(resnet20_adder, (3, 32, 32), "cifar10", None),
}


def _load_callable(spec: str) -> Callable[[], nn.Module]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise QpipeError(f"model {spec!r} is neither a registry name ({', '.join(REGISTRY)}) "
                         "nor 'path/to/file.py:callable' / 'package.module:callable'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise QpipeError(f"model file {target} does not exist")
        name = f"qpipe_user_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: report, don't trace back
            raise QpipeError(f"could not import {target}: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:  # the user's module: report, don't trace back
            raise QpipeError(f"could not import module {target!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise QpipeError(f"{target} has no callable {attr!r}")
    return fn


HF_PREFIX = "hf:"


def hf_model(folder: str) -> nn.Module:
    """A Hugging Face ``transformers`` model from a local folder (``config.json`` and its weights, as
    ``save_pretrained`` writes them), as the class its config names (``architectures``), else ``AutoModel``.
    Weights load through transformers: safetensors, or ``torch.load(weights_only=True)``."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise QpipeError(f"model hf:{folder}: {path / 'config.json'} does not exist (give a folder written by "
                         "save_pretrained)")
    try:
        import transformers
    except ImportError as e:
        raise QpipeError("hf: models need the transformers package: pip install 'qpipe[hf]'") from e
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(path))
        arch = next((a for a in (getattr(cfg, "architectures", None) or []) if hasattr(transformers, a)), None)
        cls = getattr(transformers, arch) if arch else transformers.AutoModel
        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()   # qpipe shows its own progress
        try:
            model = cls.from_pretrained(str(path))
        finally:
            transformers.logging.set_verbosity(level)
            transformers.logging.enable_progress_bar()
    except QpipeError:
        raise
    except Exception as e:  # a broken folder: say which, in one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise QpipeError(f"model hf:{folder} could not be loaded ({type(e).__name__}: {first})") from e
    return model.eval()


def build_model(spec: str) -> nn.Module:
    """An untrained model from a registry name or a ``module:callable`` spec (``hf:DIR``: a Hugging Face model
    folder, with its weights)."""
    if spec in REGISTRY:
        return REGISTRY[spec].build()
    if spec.startswith(HF_PREFIX):
        return hf_model(spec[len(HF_PREFIX):])
    fn = _load_callable(spec)
    try:
        model = fn()
    except Exception as e:
        raise QpipeError(f"{spec} raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise QpipeError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise QpipeError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QpipeError(f"checkpoint {path} could not be read ({first[:200]}); "
                         "expected a torch state dict (.pt/.pth) or a .safetensors file") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise QpipeError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_weights(model: nn.Module, path: str | Path, name: str | None = None) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (keys and shapes must match; ``name`` is for messages)."""
    sd = read_state_dict(path)
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise QpipeError(f"checkpoint {path}: tensor {k!r} has {bad} NaN/Inf values")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        first = [f"first {kind} key {keys[0]!r}" for kind, keys in (("missing", missing), ("unexpected", unexpected))
                 if keys]
        raise QpipeError(f"checkpoint {path} does not match the model{' ' + name if name else ''}: "
                         f"{', '.join(first)} ({len(missing)} missing, {len(unexpected)} unexpected)")
    wrong = [k for k in own if own[k].shape != sd[k].shape]
    if wrong:
        k = wrong[0]
        raise QpipeError(f"checkpoint {path}: {k} has shape {tuple(sd[k].shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(sd)
    return model


def load_model(spec: str, weights: str | Path | None = None) -> nn.Module:
    """Build ``spec`` and load ``weights`` (or the registry's shipped checkpoint); eval mode."""
    if spec.startswith(HF_PREFIX) and weights is not None:
        raise QpipeError(f"model {spec}: its weights come from the folder; leave --weights out")
    model = build_model(spec)
    if weights is None and spec in REGISTRY and REGISTRY[spec].checkpoint:
        ckpt = ROOT / REGISTRY[spec].checkpoint
        if ckpt.is_file():
            weights = ckpt
    if weights is not None:
        load_weights(model, weights, spec)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise QpipeError(f"model {spec}: parameter {name!r} has NaN/Inf values")
    return model.eval()


def input_shape(spec: str, data_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    if data_shape is not None:
        return tuple(data_shape)
    if spec in REGISTRY:
        return REGISTRY[spec].input_shape
    raise QpipeError(f"input shape of {spec} unknown; give --data")


def n_params(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
