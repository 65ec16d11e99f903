"""Data-parallel evaluation under a launcher: `torchrun --nproc_per_node N -m ctxpatch eval ...` or
`accelerate launch -m ctxpatch eval ...`.

Both launchers start N processes with RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT) in the environment.
Each process loads the model (on cuda:LOCAL_RANK on a GPU machine), joins one torch.distributed group (gloo on
CPU, nccl on CUDA), and `CtxpatchLM` splits the requests lm-eval hands it over the processes and gathers every
result to every process. lm-eval itself sees one process (rank 0 of 1) everywhere, so each process runs the
same tasks and post-processing on the same results: the leaderboard is the one-process leaderboard, and rank 0
alone writes it.

Why not lm-eval's own data parallelism: it shards *documents* by rank and, when a task has fewer documents than
processes (one length, one depth), the process left without any fails in post-processing (`task.instances[0]`)
while the others wait at a barrier. Splitting requests has no such floor.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch

from .errors import EvalError

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a launch: rank of world_size, and its GPU index on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's share of `items`: every world_size-th one, from its rank (round robin)."""
        return list(items[self.rank :: self.world_size])


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """The launch described by the launcher's environment variables (one process of one when there are none)."""
    env = os.environ if environ is None else environ
    try:
        rank, world_size = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local_rank = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise EvalError(
            f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, LOCAL_RANK={env.get('LOCAL_RANK')!r} "
            "are not whole numbers: start the processes with torchrun or accelerate launch"
        ) from None
    if not 0 <= rank < world_size:
        raise EvalError(f"RANK={rank} is outside WORLD_SIZE={world_size}: start the processes with torchrun")
    return Launch(rank, world_size, local_rank)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(device: str | None, launch: Launch, device_map: str | None = None) -> str | None:
    """The device this process evaluates on: None when `device_map` spreads the model, else `device` or the
    default (cuda when there is a GPU, else cpu). Under a multi-process launch "cuda" is this process's own
    GPU, cuda:LOCAL_RANK; one GPU for every process ("cuda:1") is refused."""
    if device_map is not None:
        if device is not None:
            raise EvalError(f"--device {device} and --device-map {device_map} both place the model: pass one")
        if launch.distributed:
            raise EvalError(
                f"--device-map {device_map} spreads one model over every GPU, and {launch.world_size} processes "
                "would each do so: launch one process for a model larger than a GPU, or drop --device-map"
            )
        return None
    name = device if device is not None else ("cuda" if cuda_available() else "cpu")
    try:
        parsed = torch.device(name)
    except RuntimeError:
        raise EvalError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not cuda_available():
            raise EvalError(f"--device {name}: this machine has no CUDA GPU that torch can use; pass --device cpu")
        if launch.distributed:
            if parsed.index is not None:
                raise EvalError(
                    f"--device {name} under a {launch.world_size}-process launch would put every process on one "
                    "GPU: pass --device cuda (each process takes cuda:LOCAL_RANK)"
                )
            return f"cuda:{launch.local_rank}"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise EvalError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return str(parsed)


def backend_for(device: torch.device | str) -> str:
    """torch.distributed's backend for tensors on `device`: nccl for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def join(launch: Launch, device: torch.device | str) -> None:
    """Join the launch's process group (created on first call; nothing to do for one process)."""
    if not launch.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != launch.world_size:
            raise EvalError(
                f"a process group of {dist.get_world_size()} process(es) exists, but WORLD_SIZE={launch.world_size}"
            )
        return
    backend = backend_for(device)
    if backend == "nccl":  # nccl's object collectives use the current device
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size)


def all_gather_object(launch: Launch, obj: Any) -> list[Any]:
    """`obj` of every process, in rank order (a list of one without a launch)."""
    if not launch.distributed:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * launch.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def merged(launch: Launch, compute: Callable[[], dict[Any, T]]) -> dict[Any, T]:
    """Every process's `compute()` results ({key: value}, its share of a common list of work), merged.

    An exception in one process is raised in every process: the others would otherwise wait forever for its
    results (a prompt too long for one process's share is a TruncationError everywhere)."""
    try:
        mine, failure = compute(), None
    except Exception as error:  # noqa: BLE001 - handed to the other processes, then raised here
        mine, failure = {}, error
    if not launch.distributed:
        if failure is not None:
            raise failure
        return mine
    parts = all_gather_object(launch, (mine, None if failure is None else portable(failure)))
    if failure is not None:
        raise failure
    out: dict[Any, T] = {}
    for rank, (part, error) in enumerate(parts):
        if error is not None:
            raise error
        out.update(part)
    return out


def portable(error: Exception) -> Exception:
    """`error` if it survives pickling (to travel to the other processes), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(error).__name__}: {error}")


def finish(launch: Launch) -> None:
    """Leave the process group once every process is done (end of `ctxpatch eval` under a launcher)."""
    if not launch.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
