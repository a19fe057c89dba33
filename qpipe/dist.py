"""Data parallelism with ``torch.distributed`` (``torchrun --nproc-per-node N -m qpipe ...``): gloo on CPU, nccl
on CUDA. Outside torchrun (no ``WORLD_SIZE`` > 1 in the environment) every helper is the single-process no-op.

Batches are sharded round-robin by their global index (batch i goes to rank i mod N); what ranks computed is
gathered or reduced so that every rank ends with the single-process result, and only rank 0 writes files.
"""

from __future__ import annotations

import atexit
import os


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu") -> tuple[int, int]:
    """(rank, world size); initialises the process group on first use under torchrun."""
    if not active():
        return 0, 1
    dist = _dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        atexit.register(_shutdown)  # a gloo group left alive at interpreter exit aborts the process
    return dist.get_rank(), dist.get_world_size()


def _shutdown() -> None:
    dist = _dist()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return init()[0] if active() else 0


def shard(batches, device: str = "cpu"):
    """(global index, batch) for this rank's share of ``batches``."""
    r, w = init(device)
    for i, b in enumerate(batches):
        if i % w == r:
            yield i, b


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order (a one-element list outside torchrun)."""
    if not active():
        return [obj]
    out = [None] * _dist().get_world_size()
    _dist().all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        _dist().barrier()
