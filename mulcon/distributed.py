"""Data-parallel training over processes: `torchrun --nproc_per_node N -m mulcon train ...`.

torchrun starts one process per GPU (or N CPU processes) and sets RANK, WORLD_SIZE and LOCAL_RANK;
`process_group` joins them (NCCL on CUDA, gloo on CPU). Without those variables every function here
is a no-op and training runs in one process exactly as before.

The batch sizes of params.yaml are global: each of the W ranks takes batch_size / W images of every
batch (`EpochSampler` gives rank r every W-th image of the epoch's permutation), so the W local
batches of a step together are the batch one process would see.

Gradient scaling. The contrastive loss (Eq. 8) is computed on every rank over the projections and
targets gathered from all ranks, so anchors, positives and the denominator span the global batch.
The backward of `all_gather_with_grad` sums the gradients that the W copies of that loss send to
each rank's own rows (W * dL/dz_r), and DDP averages the parameter gradients over the W ranks, so
each parameter receives dL/dtheta of the loss on the concatenated batch. The BCE term is a mean
over a rank's images; DDP's average of the W means is the mean over the global batch. Together the
gradients equal those of one process on the global batch (tests/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from mulcon.errors import ConfigError

logger = logging.getLogger(__name__)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of training processes (WORLD_SIZE of torchrun; 1 when not launched by it)."""
    return dist.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 when not launched by torchrun)."""
    return dist.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its node: the index of its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files and logs to MLflow (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if _initialized():
        dist.barrier()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join the torchrun job for the `with` block; yields this process's device.

    On CUDA each process takes the GPU of its LOCAL_RANK. A process group that is already up (a
    caller that set it up itself) is used and left as it is; one process needs none.
    """
    if world_size() == 1 or _initialized():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    logger.info("rank %d of %d on %s (%s)", rank(), world_size(), device, backend)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def local_batch_size(batch_size: int) -> int:
    """This rank's share of a global batch.

    Raises:
        ConfigError: `batch_size` is not a multiple of the number of processes.
    """
    count = world_size()
    if batch_size % count:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {count} training processes "
                          "(batch sizes are global: each process takes batch_size / processes)")
    return batch_size // count


def wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """`model` in DistributedDataParallel when there are several processes, else `model` itself.

    Args:
        find_unused_parameters: some parameters get no gradient (the projector in a BCE-only step).

    On CUDA the BatchNorm layers become SyncBatchNorm (in place, same parameters and state-dict
    keys), so their statistics are those of the global batch as in one process. gloo on CPU
    cannot synchronise them: there each rank normalises its own images.
    """
    if world_size() == 1:
        return model
    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=find_unused_parameters)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank its rows' gradient summed over all ranks."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum of every rank's copy of the loss (see the module docstring)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def _check_same_shape(tensor: torch.Tensor) -> None:
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, tuple(tensor.shape))
    if len(set(shapes)) > 1:
        raise ValueError(f"all ranks must gather tensors of one shape, got {shapes}")


def all_gather_with_grad(tensor: torch.Tensor, check_shapes: bool = False) -> torch.Tensor:
    """The (W * N, ...) concatenation, in rank order, of the (N, ...) `tensor` of every rank; the
    gradient flows back to each rank's own rows. `tensor` itself when there is one process.

    Every rank must pass the same shape (`check_shapes` verifies it, at the cost of one more
    collective: training batches always have the same size, see `EpochSampler`).
    """
    if world_size() == 1:
        return tensor
    if check_shapes:
        _check_same_shape(tensor)
    return _GatherWithGrad.apply(tensor)


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """`all_gather_with_grad` without a gradient (targets, labels)."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (loss averages for the epoch's record)."""
    if world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()
