"""Several processes filling one run directory: `torchrun --nproc_per_node=K analyze.py ...` (and multi-node torchrun).

torchrun starts K copies of the command and tells each its place in the environment (RANK, WORLD_SIZE,
LOCAL_RANK). minidit uses torch.distributed only to agree: rank 0 opens the run directory (and holds its lock)
while the others wait, every rank samples every K-th missing prompt and writes its records itself (records
are independent files), and rank 0 aggregates once all have finished. NCCL joins the ranks on GPUs (one GPU per
rank: cuda:LOCAL_RANK), gloo on CPUs. A rank that dies takes its prompt in flight with it, nothing else: the
others' records are whole files, and `--resume` (under torchrun or not) samples only what is missing.
"""

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from minidit.errors import MiniditError, error_line

T = TypeVar("T")
TIMEOUT = timedelta(hours=6)  # how long a rank waits for the others at a barrier (a slow rank is not a dead one)


class Reported(MiniditError):
    """An error rank 0 has printed already: every rank stops (exit code 2) without another word."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0


def from_environment() -> Ranks:
    """This process's place among torchrun's processes (a single process when not started by torchrun)."""
    if "WORLD_SIZE" not in os.environ:
        return Ranks()
    try:
        return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    except (KeyError, ValueError):
        raise MiniditError("WORLD_SIZE is set but RANK is missing or not a number: start several processes with "
                           "torchrun, not by setting the variables by hand") from None


def rank_device(device: str, ranks: Ranks) -> str:
    """The device of this rank: with several ranks on CUDA, cuda:LOCAL_RANK (a device index given is refused)."""
    if ranks.world == 1 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise MiniditError(f"--device {device} under torchrun: pass --device cuda, each rank takes cuda:LOCAL_RANK")
    if ranks.local_rank >= torch.cuda.device_count():
        raise MiniditError(f"rank {ranks.rank} needs cuda:{ranks.local_rank}, this machine has "
                           f"{torch.cuda.device_count()} GPUs: pass --nproc_per_node at most the number of GPUs")
    torch.cuda.set_device(ranks.local_rank)
    return f"cuda:{ranks.local_rank}"


def join(ranks: Ranks, device: str) -> None:
    """Join the other ranks (NCCL on CUDA, gloo otherwise); nothing to do for a single process."""
    if ranks.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)


def finish(ranks: Ranks) -> None:
    """On success, every rank waits here until all are done (rank 0 aggregates last), so that all of them take the
    process group down together: a gloo rank that tore it down while a peer was still busy was seen to abort
    ("terminate called without an active exception"). Not on an error path, where a peer may be stuck elsewhere."""
    if ranks.world > 1 and dist.is_initialized():
        dist.barrier()


def leave(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def on_leader(ranks: Ranks, work: Callable[[], T]) -> T:
    """Run `work` on rank 0 while the other ranks wait, and give its result to every rank (a small object: it is
    pickled). If it fails there, every rank stops. Rank 0 prints the error before it tells the others (`Reported`):
    once one rank exits, torchrun stops the rest, so a line printed later might never be."""
    if ranks.world == 1:
        return work()
    result, error = None, None
    if ranks.leader:
        try:
            result = work()
        except (MiniditError, OSError) as e:
            print(error_line(e), file=sys.stderr, flush=True)
            error = Reported(str(e))
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are told
            error = e
    message = [error is not None, result]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0]:
        raise Reported("rank 0 failed")
    return message[1]


def gather(ranks: Ranks, value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank (waits for all of them)."""
    if ranks.world == 1:
        return [value]
    values = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values
