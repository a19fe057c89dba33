"""``qpipe train``: trains the demo models (float), writes a safetensors checkpoint and a JSON note
with the command, seed and test accuracy beside it."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qpipe.artifact import write_atomic, write_json
from qpipe.errors import QpipeError


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero fill): cheap augmentation for tiny images."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def check_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda"):
        raise QpipeError(f"unknown device {device!r}; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise QpipeError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu")
    return torch.device(device)


@torch.no_grad()
def accuracy(model, source, split="test", batch_size=256) -> float:
    model.eval()
    dev = next(iter(model.parameters()), torch.empty(0)).device
    correct = total = 0
    for x, y in source.batches(split, batch_size):
        correct += int((model(x.to(dev)).argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / max(total, 1)


OPTIMIZERS = ("adamw", "sgd")


EPOCHS = 40          # the demo checkpoints' schedule
LR = 3e-3            # AdamW one-cycle peak (SGD: the starting lr of the cosine schedule)
BATCH_SIZE = 64
SEED = 0


def train(model_spec: str, data: str, epochs: int | None, out: str | Path, *, lr: float | None = None,
          batch_size: int | None = None, weight_decay: float = 5e-4, seed: int | None = None,
          command: str | None = None, progress: bool = True, optimizer: str | None = None,
          device: str = "cpu") -> dict:
    """``adamw`` (default): AdamW with a one-cycle schedule (the demo CNN / ViT); ``sgd``: SGD with momentum 0.9 and
    a cosine schedule (AdderNets, as in their paper: the adaptive gradient scaling expects plain SGD).
    ``None`` takes the defaults above (what ``qpipe train`` does when an option is not given)."""
    epochs = EPOCHS if epochs is None else epochs
    lr = LR if lr is None else lr
    batch_size = BATCH_SIZE if batch_size is None else batch_size
    seed = SEED if seed is None else seed
    optimizer = optimizer or OPTIMIZERS[0]
    from qpipe.data import load_data
    from qpipe.models import build_model

    if epochs < 1:
        raise QpipeError(f"--epochs must be at least 1, got {epochs}")
    if optimizer not in OPTIMIZERS:
        raise QpipeError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise QpipeError(f"--out must end in .safetensors, got {out}")
    dev = check_device(device)
    torch.manual_seed(seed)
    model = build_model(model_spec).to(dev)
    source = load_data(data)
    g = torch.Generator().manual_seed(seed)
    n = source.size("train")
    steps = epochs * math.ceil(n / batch_size)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    bar = tqdm(range(epochs), desc=f"train {model_spec}", disable=None if progress else True)
    for epoch in bar:
        model.train()
        tot = 0.0
        for x, y in source.batches("train", batch_size, shuffle_seed=seed * 1000 + epoch):
            if x.shape[-1] <= 32:
                x = _shift(x, g)
            x, y = x.to(dev), y.to(dev)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(x)
        bar.set_postfix(loss=f"{tot / n:.4f}")
    acc = accuracy(model, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save as st_save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out, st_save(state))
    note = {"model": model_spec, "data": data, "epochs": epochs, "optimizer": optimizer, "lr": lr, "batch_size": batch_size,
            "weight_decay": weight_decay, "seed": seed, "device": device, "test_top1": acc, "torch": torch.__version__,
            "command": command or "qpipe.pipeline.train.train()", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(out.with_suffix(".json"), note)
    return note


__all__ = ("train", "accuracy")
