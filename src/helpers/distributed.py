"""Several processes at once (`accelerate launch`, `torchrun`): which share of the work is mine, and the merged result.

Under `accelerate launch --config_file configs/accelerate/ddp.yaml -m helpers.cli run ...` every process runs the
same notebooks. Trainers (TRL's SFTTrainer, the RRHF Trainer) split batches across processes by themselves; the
image executor, the agent's decoding and the scorers call `map_sharded`, which gives each process every
`world_size`-th item of the list the main process holds and returns the merged list, in the original order, to all
of them. Only the main process writes stage folders and executed notebooks (`helpers.manifest.Stage`,
`helpers.runner`); the others compute into scratch folders. With one process everything here is a no-op.
"""
from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def launched_world_size() -> int:
    """The number of processes the launcher started (1 when run plainly), read from the environment only."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when run plainly), without touching torch.distributed."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    return launched_rank() == 0


def local_world_size() -> int:
    """The number of processes the launcher started on this machine (`LOCAL_WORLD_SIZE`; the whole world if unset)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or launched_world_size())


@contextlib.contextmanager
def main_alone_threads() -> Iterator[int]:
    """While the main process computes alone and every other process waits for its result: its BLAS and torch
    thread pools widened to the cores the others leave idle, and set back after. Yields the thread count.

    `accelerate launch` (and `torchrun`) start each process with OMP_NUM_THREADS=1, so that eight processes on one
    machine do not fight over its cores. Work only the main process does (ChatGen's set-level FIDs: sums of outer
    products and eigenvalues of 2048 × 2048 matrices) would then run on one core of a machine with dozens, while
    the others wait. A waiting process may still spin one core in its collective, so those are left to them.
    Run plainly (one process) this changes nothing: the process already has the threads it was given.
    """
    import torch

    if launched_world_size() == 1:
        yield torch.get_num_threads()
        return
    from threadpoolctl import threadpool_limits

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    before = torch.get_num_threads()
    threads = max(before, cores - (local_world_size() - 1))
    if threads == before:
        yield before
        return
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):  # numpy's OpenBLAS (and any OpenMP pool) read theirs at start-up
            yield threads
    finally:
        torch.set_num_threads(before)


def cpu_launch() -> bool:
    """Several processes launched on a machine without a GPU (the two-process CPU runs of the tests and book)."""
    if launched_world_size() == 1:
        return False
    import torch

    return not torch.cuda.is_available()


def _launch_flag(name: str) -> bool:
    """A yes/no setting `accelerate launch` passes its processes in the environment."""
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


def fsdp_launch() -> bool:
    """Launched with an FSDP config (`configs/accelerate/fsdp.yaml`): the Trainers will shard the model. FSDP 1
    flattens each wrapped layer's weights into one tensor of one dtype, so a model it trains is loaded in one dtype
    throughout (no bf16 base beside fp32 LoRA adapters)."""
    return _launch_flag("ACCELERATE_USE_FSDP")


def fsdp_checkpoints_activations() -> bool:
    """An FSDP launch whose config recomputes each wrapped layer's activations itself (`fsdp_activation_checkpointing`
    in `configs/accelerate/fsdp.yaml`), in place of the model's own gradient checkpointing."""
    return fsdp_launch() and _launch_flag("FSDP_ACTIVATION_CHECKPOINTING")


# How long a process waits in a collective for the others before its launch is aborted: what transformers' Trainer
# starts the group with (`TrainingArguments.ddp_timeout`, 30 minutes), so that the limit does not depend on whether
# a Trainer or this module joined first. NCCL's own default is 10 minutes, which any work the main process does
# alone while the others wait in a collective (ChatGen's set-level FIDs, say) would then have to stay within.
GROUP_TIMEOUT = timedelta(minutes=30)


def world() -> tuple[int, int]:
    """(rank, world size), joining the launcher's process group on first use (gloo on CPU, NCCL on GPUs)."""
    if launched_world_size() == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    leave_group_at_exit()
    if dist.is_available() and dist.is_initialized():
        # already joined (by a Trainer's arguments, say): the group itself is the truth. accelerate's shared state
        # may say otherwise, e.g. one process on a CPU when TrainingArguments started the group without use_cpu
        return dist.get_rank(), dist.get_world_size()
    from accelerate import PartialState

    # initialises torch.distributed from the launcher's environment, once per process (accelerate's state is
    # shared, so the Trainers later find the same process group); without a GPU it must be told to use gloo
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=GROUP_TIMEOUT)
    return state.process_index, state.num_processes


_leaving_at_exit = False


def leave_group_at_exit() -> None:
    """Leave the process group when this process exits, once registered (a script, a notebook's kernel).

    A process that exits still in its group can abort at exit while gloo's threads are torn down ("terminate called
    without an active exception"), and NCCL warns that the group was never destroyed; leaving it is the documented
    end. Registered by `config.setup` under a launch and when a launched process first asks for its world, so
    whichever of this module or a Trainer started the group, it is left.
    """
    global _leaving_at_exit
    if _leaving_at_exit:
        return
    import atexit

    atexit.register(_leave_group)
    _leaving_at_exit = True


def _leave_group() -> None:
    if "torch.distributed" not in sys.modules:  # never joined one: nothing to leave, and no torch to import
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_sharding_depth = 0  # > 0 while this process works on its own share (collectives would not be matched there)


def in_shard() -> bool:
    """Is this process inside `map_sharded`'s function, doing work the others do not do?"""
    return _sharding_depth > 0


def barrier() -> None:
    """Wait until every process gets here (no-op for one process)."""
    if world()[1] > 1:
        if in_shard():
            raise RuntimeError("a barrier inside sharded work would wait for processes that never reach it; "
                               "build what the shard needs (weights, stages) before calling map_sharded")
        import torch.distributed as dist

        dist.barrier()


def broadcast_from_main(value: Any) -> Any:
    """The main process's `value`, on every process (so all of them agree on what is left to do)."""
    if world()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def link_main_output(folder: Path) -> None:
    """After a save that only the main process performs, give every other process the main process's files.

    transformers writes checkpoints on rank 0 alone, so a process that computes beside the main one (into a
    scratch folder) finds no weights where it saved. Each such process links its folder's missing entries to the
    main process's folder, and can load the model it helped train. Every process must call this (a collective).
    """
    if launched_world_size() == 1:
        return
    main_folder = Path(broadcast_from_main(str(Path(folder).resolve())))
    barrier()  # the main process has finished writing
    if is_main_process():
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for item in main_folder.iterdir():
        link = folder / item.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(item)


def shard_indices(count: int, rank: int, world_size: int, chunk: int = 1) -> list[int]:
    """The positions process `rank` handles: every `world_size`-th run of `chunk` positions, starting at its own.

    Interleaving keeps each process's share alike when the list is sorted (by length, by sampler), so no
    process waits long for the slowest. With `chunk` = the consumer's batch size every batch holds the items a
    single process would batch together, so batched arithmetic rounds the same way.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, {world_size})")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be at least 1")
    return [i for i in range(count) if (i // chunk) % world_size == rank]


def merge_shards(shards: Sequence[Sequence[Result]], count: int, chunk: int = 1) -> list[Result]:
    """The inverse of `shard_indices`: per-process result lists back into one list in the original order."""
    return _merge(shards, [shard_indices(count, rank, len(shards), chunk) for rank in range(len(shards))], count)


def _merge(shards: Sequence[Sequence[Result]], positions: Sequence[Sequence[int]], count: int) -> list[Result]:
    merged: list[Any] = [None] * count
    for rank, (results, places) in enumerate(zip(shards, positions)):
        if len(results) != len(places):
            raise ValueError(f"process {rank} returned {len(results)} results for {len(places)} items")
        for position, value in zip(places, results):
            merged[position] = value
    return merged


def balanced_runs(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Positions per process: one run of consecutive positions each, the costliest run as cheap as it can be.

    For work whose neighbours share set-up (image batches in weights order share a loaded pipeline) a run each
    keeps the set-up to about a process's share, where turns would have every process load nearly everything;
    balancing the cost, not the count, keeps a process that got the large images from finishing last.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1")
    if any(cost < 0 for cost in costs):
        raise ValueError(f"costs must not be negative, got {min(costs)}")

    def runs_within(limit: float) -> list[list[int]]:
        runs: list[list[int]] = [[]]
        total = 0.0
        for position, cost in enumerate(costs):
            if runs[-1] and total + cost > limit:
                runs.append([])
                total = 0.0
            runs[-1].append(position)
            total += cost
        return runs

    low, high = max(costs, default=0.0), float(sum(costs))
    for _ in range(64):  # the smallest limit that fits in `world_size` runs, to float precision
        if high - low <= 1e-9 * max(high, 1.0):
            break
        middle = (low + high) / 2
        low, high = (low, middle) if len(runs_within(middle)) <= world_size else (middle, high)
    runs = runs_within(high) if costs else []
    return runs + [[] for _ in range(world_size - len(runs))]


def map_sharded(fn: Callable[[list[Item]], Sequence[Result]], items: Sequence[Item], chunk: int = 1,
                cost: Callable[[Item], float] | None = None) -> list[Result]:
    """`fn(items)` with the items split across processes; every process gets the whole result, in order.

    `fn` takes a list and returns one result per item. The main process's `items` are used everywhere, so
    processes that read a cache at slightly different moments still split the same work. `chunk`: see
    `shard_indices`. `cost(item)`: each process takes one run of consecutive items instead, of about equal total
    cost (`balanced_runs`).
    """
    rank, world_size = world()
    if world_size == 1:
        return list(fn(list(items)))
    import torch.distributed as dist

    global _sharding_depth
    items = broadcast_from_main(list(items))
    if cost is None:
        positions = [shard_indices(len(items), process, world_size, chunk) for process in range(world_size)]
    else:
        positions = balanced_runs([cost(item) for item in items], world_size)
    mine = [items[i] for i in positions[rank]]
    _sharding_depth += 1
    try:
        local = list(fn(mine)) if mine else []
    finally:
        _sharding_depth -= 1
    shards: list[Any] = [None] * world_size
    dist.all_gather_object(shards, local)
    return _merge(shards, positions, len(items))
