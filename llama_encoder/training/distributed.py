"""The little of torch.distributed the training loop needs: who am I, gather embeddings with gradients, sum
gradients and counts. A single process is the same code with a world of one.

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; the process group uses NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

logger = logging.getLogger(__name__)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the summed gradient of its own slice: every process's loss
    uses every slice, so a slice's gradient is the sum over processes."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = torch_dist.get_world_size()
        ctx.rank, ctx.size = torch_dist.get_rank(), tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(world)]
        torch_dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


@dataclass
class Distributed:
    """This process's place in the job. `gather` and `sum_int` are identities (plus offset 0) for one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: str | None = None) -> Distributed:
        """Join the process group `torchrun` describes (RANK, WORLD_SIZE), or stay a single process."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not torch_dist.is_initialized():
            backend = "nccl" if (device or "").startswith("cuda") else "gloo"
            torch_dist.init_process_group(backend=backend)
        logger.info("Process %d of %d (local rank %d)", rank, world_size, local_rank)
        if (device or "").startswith("cuda"):
            device = f"cuda:{local_rank}"
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=device or "cpu")

    def gather(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every process's rows of `tensor` (equal row counts), in rank order, with gradients flowing back to each
        process's own rows; and where this process's rows start."""
        if not self.enabled:
            return tensor, 0
        return _GatherWithGrad.apply(tensor), self.rank * tensor.shape[0]

    def sum_int(self, value: int) -> int:
        """`value` summed over all processes."""
        if not self.enabled:
            return value
        total = torch.tensor([value], dtype=torch.long, device=self.device)
        torch_dist.all_reduce(total)
        return int(total.item())

    def sum_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` (gradients) across processes in place, as one flat buffer."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch_dist.all_reduce(flat)
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


__all__ = ["Distributed"]
