"""Process-group setup from torchrun's environment, the rank helpers, and the few collectives the
trainer and the evaluations use.

``torchrun`` (single node or multi-node rendezvous) sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; without them the run is one process and no process group is
created. GPUs communicate over NCCL, CPU processes over gloo.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dino_fast.errors import UserError

logger = logging.getLogger(__name__)


class DistributedSetupError(UserError, RuntimeError):
    """The launch environment cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # "nccl", "gloo", or None for a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise DistributedSetupError(f"environment variable {name}={raw!r} is not an integer") from exc


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` -> the local rank's GPU when CUDA is present, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError(
                "--device cuda was asked for but torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu"
            )
        count = torch.cuda.device_count()
        index = device.index if device.index is not None else local_rank
        if index >= count:
            raise DistributedSetupError(
                f"LOCAL_RANK {local_rank} needs GPU {index} but only {count} are visible; launch with "
                f"torchrun --nproc_per_node={count} (or fewer)"
            )
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Create the process group when launched by torchrun; otherwise describe a single process."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedSetupError(f"RANK={rank} / WORLD_SIZE={world_size} is not a valid launch")
    torch_device = resolve_device(device, local_rank)
    if world_size == 1:
        return DistInfo(0, 1, local_rank, torch_device, None)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise DistributedSetupError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} is unset; launch with torchrun "
            "(e.g. `torchrun --nproc_per_node=8 -m dino_fast.train ...`), which sets them"
        )
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        if torch_device.type == "cuda":
            kwargs["device_id"] = torch_device
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return DistInfo(rank, world_size, local_rank, torch_device, backend)


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_context(device: str = "auto") -> Iterator[torch.device]:
    """Join the process group torchrun describes (if any) and yield this process's device.

    ``torchrun --nproc_per_node=N`` sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU.
    A plain ``python -m`` run is one process on the first GPU, else the CPU. A group created here
    is destroyed on exit.
    """
    created = not is_initialized()
    info = init_distributed(device)
    try:
        yield info.device
    finally:
        if created:
            cleanup()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def shard_indices(num_samples: int, world_size: int, rank: int) -> list[int]:
    """Rank ``rank``'s interleaved shard, padded by wrapping around (``DistributedSampler`` order)."""
    per_rank = -(-num_samples // world_size)
    padded = list(range(num_samples)) + list(range(per_rank * world_size - num_samples))
    return padded[rank::world_size]


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one element without a process group)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum_async(tensor: torch.Tensor) -> dist.Work | None:
    """Start a sum all-reduce in place; returns the handle to wait on (None without a group)."""
    if not is_initialized():
        return None
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
