"""A model's inputs as a batch: one tensor (``x``, N x ...) or several by name (``{"input_ids": ..., ...}``).

Every stage moves batches through these few functions, so a model with one image input and a transformer with
token ids and an attention mask go through the same code. Integer tensors (ids, masks, positions) keep their
dtype end to end: nothing here casts them. Imports nothing from ``qpipe.pipeline``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from qpipe.errors import QpipeError

Batch = torch.Tensor | dict[str, torch.Tensor]

SINGLE = "input"   # the ONNX name of a one-tensor model's input (and the key such a batch gets as a dict)


def is_named(x: Batch) -> bool:
    return isinstance(x, Mapping)


def items(x: Batch) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs; a single tensor is named ``input``."""
    return list(x.items()) if is_named(x) else [(SINGLE, x)]


def batch_len(x: Batch) -> int:
    """Samples in the batch (dimension 0 of its first tensor)."""
    return len(next(iter(x.values()))) if is_named(x) else len(x)


def attention_mask(x: Batch) -> torch.Tensor | None:
    """The batch's attention mask (N x L, 1 for a real token, 0 for padding), where it has one."""
    return x.get("attention_mask") if is_named(x) else None


def real_tokens(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The values of activation ``y`` that real tokens produce (padding dropped; a flat tensor), or ``y`` itself
    where it is not laid out by token. Layouts: a token sequence N x L x ... (hidden states), per head
    N x H x L x ... (one row per query) and, where the last axis is L too, an attention map whose padded key
    columns go as well (the softmax mask removes them). Ambiguous layouts (H == L) are kept whole."""
    if mask is None or y.ndim < 3:
        return y
    keep = mask.to(device=y.device, dtype=torch.bool)
    if not keep.any():
        return y
    n, length = keep.shape
    by_token = tuple(y.shape[:2]) == (n, length)
    by_head = y.ndim >= 4 and y.shape[0] == n and y.shape[2] == length
    if by_token and not by_head:
        return y[keep]
    if by_head and not by_token:
        if y.ndim > 4:
            return y.transpose(1, 2)[keep]
        real = keep[:, None, :, None]
        if y.shape[3] == length:
            real = real & keep[:, None, None, :]
        return y[real.expand_as(y)]
    return y


def to(x: Batch, device) -> Batch:
    return {k: v.to(device) for k, v in x.items()} if is_named(x) else x.to(device)


def take(x: Batch, index) -> Batch:
    """Rows ``index`` (a slice or an index tensor) of every tensor."""
    return {k: v[index] for k, v in x.items()} if is_named(x) else x[index]


def cat(xs: Sequence[Batch]) -> Batch:
    """Batches joined along dimension 0 (all of one kind; named batches need the same names). Named batches padded
    to different sequence lengths (dimension 1) are right-padded with zeros to the longest first: an attention mask
    of 0 masks the added positions, whatever the padded id is."""
    if not xs:
        raise QpipeError("calibration data is empty")
    if not is_named(xs[0]):
        return torch.cat(list(xs))
    names = list(xs[0])
    for b in xs[1:]:
        if list(b) != names:
            raise QpipeError(f"data: batches name different inputs ({names} and {list(b)})")
    out = {}
    for k in names:
        ts = [b[k] for b in xs]
        if len({t.shape[2:] for t in ts}) == 1 and all(t.ndim >= 2 for t in ts):
            length = max(t.shape[1] for t in ts)
            ts = [torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, length - t.shape[1])) for t in ts]
        try:
            out[k] = torch.cat(ts)
        except RuntimeError as e:
            raise QpipeError(f"data: batches of input {k!r} have shapes that cannot be joined "
                             f"({', '.join(str(tuple(t.shape)) for t in ts[:3])}, ...)") from e
    if "attention_mask" not in out and any(len({b[k].shape[1] for b in xs if b[k].ndim >= 2}) > 1 for k in names):
        raise QpipeError("data: batches of different sequence lengths need an attention_mask to be joined")
    return out


def call(model, x: Batch):
    """``model(x)``, or ``model(**x)`` for named inputs."""
    return model(**x) if is_named(x) else model(x)


def feed(x: Batch, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The onnxruntime feed for graph inputs ``names``: a single tensor goes to the one input whatever its name;
    named tensors go by name (each must be there)."""
    if not is_named(x):
        if len(names) != 1:
            raise QpipeError(f"the model takes {len(names)} inputs ({', '.join(names)}); the data gives one tensor")
        return {names[0]: x.detach().cpu().numpy()}
    if len(names) == 1 and len(x) == 1:   # one input: the data's name for it does not matter
        return {names[0]: next(iter(x.values())).detach().cpu().numpy()}
    missing = [n for n in names if n not in x]
    if missing:
        raise QpipeError(f"the model's input {missing[0]!r} is not in the data (the model takes {', '.join(names)}; "
                         f"the data has {', '.join(x)})")
    return {n: x[n].detach().cpu().numpy() for n in names}


def outputs(y) -> list[torch.Tensor]:
    """A model's output as a flat list of tensors (a tensor, a tuple / list, or a dict / ``ModelOutput``)."""
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, Mapping):
        return [v for v in y.values() if isinstance(v, torch.Tensor)]
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in outputs(v)]
    raise QpipeError(f"the model returned {type(y).__name__}; qpipe needs tensors (a tensor, a tuple or a dict)")


def dummy_inputs(specs, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """``record.dummy_arrays`` as tensors (tracing, shape propagation)."""
    from qpipe.record import dummy_arrays

    return tuple(torch.from_numpy(a) for a in dummy_arrays(specs, batch))


def check_lengths(limits: dict[str, int], x: Batch, dynamic: dict[str, dict[int, str]], where: str = "data") -> None:
    """Refuse a batch whose named axes (``dynamic``: input -> {axis: name}) are longer than ``limits`` allow
    (``sequence``: the model's position table)."""
    for name, t in items(x):
        for axis, axis_name in dynamic.get(name, {}).items():
            if axis_name in limits and axis < t.ndim and t.shape[axis] > limits[axis_name]:
                raise QpipeError(f"{where}: input {name!r} has {axis_name} length {t.shape[axis]}; the model's position "
                                 f"table holds {limits[axis_name]}")
