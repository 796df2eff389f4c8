"""Processes: one per device under torchrun, what they share, and the model wrapped across them.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is a
world of one, where every collective here is the identity. The model is
replicated with DDP (gradients all-reduced in backward) or sharded with
FSDP2 (parameters, gradients and optimizer state split over the processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import model_utils


@dataclass(frozen=True)
class World:
    """This process's place among the training processes, and the device it computes on."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # `cuda:LOCAL_RANK` under torchrun on GPUs

    @property
    def main(self) -> bool:
        """Process 0 logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def start_processes(device: str) -> World:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU) and bind this process's GPU; returns the world,
    whose device is the one this process computes on (`cuda:LOCAL_RANK` under torchrun)."""
    if "RANK" not in os.environ:
        return World(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


def stop_processes(world: World) -> None:
    if world.distributed:
        dist.destroy_process_group()


def sum_over_processes(values: torch.Tensor, world: World) -> torch.Tensor:
    """Each value's sum over processes, as float64 (one all-reduce; the values themselves in a world of one)."""
    values = values.to(torch.float64)
    if not world.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def mean_over_processes(values: torch.Tensor, world: World) -> torch.Tensor:
    """Each value's mean over processes, as float64."""
    return sum_over_processes(values, world) / world.size if world.distributed else values.to(torch.float64)


def any_process(flag: bool, world: World) -> bool:
    """True when the flag is set on any process, so that all take the same branch."""
    if not world.distributed:
        return flag
    tensor = torch.tensor([float(flag)], device=world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def from_main_process(value, world: World):
    """Process 0's `value` on every process (any picklable object)."""
    if not world.distributed:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def gather_objects(value, world: World) -> list:
    """Every process's `value`, in rank order, on every process."""
    if not world.distributed:
        return [value]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def wait_for_all(world: World) -> None:
    if world.distributed:
        dist.barrier()


# --------------------------------------------------------------------------
# The model across processes: DDP or FSDP2
# --------------------------------------------------------------------------


def wrap_model(model: torch.nn.Module, parallel: str, precision: str, world: World) -> torch.nn.Module:
    """DDP (gradients all-reduced in backward, so the forward always goes through the wrapper), or FSDP2
    (`shard_model`); the model itself in a world of one."""
    if not world.distributed:
        return model
    if parallel == "fsdp":
        return shard_model(model, precision)
    device_ids = [world.local_rank] if world.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place and has none)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def shard_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """FSDP2 under `fsdp_mixed_precision`: each decoder layer, then the rest, sharded over the processes."""
    from torch.distributed.fsdp import fully_shard

    policy = fsdp_mixed_precision(precision)
    for layer in model_utils.decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def fsdp_mixed_precision(precision: str):
    """FSDP2's policy: under bf16, parameters all-gathered and computed in bf16, gradients reduced in fp32.

    The sharded parameters, their gradients and the optimizer state stay fp32
    (the master copy); only the unsharded copy that each layer gathers for its
    forward and backward is bf16. That halves each all-gather's bytes and the
    unsharded copies' memory: a released dual-FFN layer (176.2M parameters) is
    705 MB gathered in fp32, 352 MB in bf16; the root group (embeddings and
    heads, 838.4M) 3.35 GB and 1.68 GB; a micro-batch's 57 all-gathers (28
    layers in forward and again in backward, the root once) 42.8 GB and 21.4 GB
    per process. Gradients are reduced over processes in fp32, so summing many
    bf16 contributions does not round away small updates. Under fp32 nothing is cast.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()
