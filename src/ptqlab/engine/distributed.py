"""Several processes, one run (torch.distributed: NCCL between GPUs, gloo between CPU processes).

Data-parallel calibration: every rank holds the model as a one-rank run does (in CPU memory, or streamed from disk)
and forwards its share of the calibration batches through the current layer; the input statistics are summed over
the ranks (Hessians, token counts, AWQ's sums; SmoothQuant's maxima taken), so every rank sees the statistics of
the whole calibration set and takes the same decisions (transforms, which experts fall back). Each linear's
quantization then runs on one owner rank, owners balanced by cost, and its result is broadcast, so every rank
propagates its batches through the same quantized layer. Only rank 0 writes.

A rank knows its place from torch's launcher variables (RANK, WORLD_SIZE, LOCAL_RANK), which `ptqlab quantize
--gpus N` and `torchrun` both set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ptqlab.errors import PtqlabError
from ptqlab.quant.linear import QuantizedLinear

if TYPE_CHECKING:
    from ptqlab.engine.statistics import InputStats


@dataclass(frozen=True)
class World:
    """This process's place among a run's ranks; the default is a run of one."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def several(self) -> bool:
        return self.size > 1

    def share(self, items: list) -> list:
        """This rank's share of `items`: every size-th, from its rank on (all ranks together: each item once)."""
        if len(items) < self.size:
            raise PtqlabError(f"{len(items)} calibration batches cannot be shared by {self.size} ranks: use fewer "
                              "GPUs, more --num-samples or a smaller --calib-batch-size")
        return items[self.rank::self.size]

    def owners(self, costs: list[float]) -> list[int]:
        """An owner rank for each job of `costs`: the costliest first, each to the least loaded rank (ties: the
        lowest rank), the same answer on every rank."""
        load = [0.0] * self.size
        owner = [0] * len(costs)
        for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            rank = min(range(self.size), key=lambda r: (load[r], r))
            owner[job] = rank
            load[rank] += costs[job]
        return owner


SINGLE = World()


def world_from_environment() -> World:
    """The World torch's launcher describes in this process's environment (a run of one without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def join(world: World, device: torch.device) -> None:
    """Join the run's process group: NCCL when this rank computes on a GPU (with NVLink multicast off: it can take
    shared GPUs out of service), gloo otherwise."""
    if not world.several or dist.is_initialized():
        return
    if device.type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place; every rank passes tensors of the same shapes in the same order."""
    for tensor in tensors:
        dist.all_reduce(tensor)


def reduce_statistics(stats: InputStats) -> None:
    """Sum (maxima: take the largest) every rank's statistics in place, so that each rank holds those of all the
    ranks' tokens. Which linears share an input is made the same everywhere first: a rank whose batches never
    reached an expert has no entry for it, and one whose first batch missed it did not see that its gate and up
    read one tensor."""
    shared: dict[str, str] = {}
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats.shared)
    for table in gathered:
        shared.update(table)
    for name, owner in shared.items():  # a linear some rank found shared keeps no statistics of its own anywhere
        for table in (stats.sums, stats.absmax, stats.abssum, stats.counts):
            table.pop(name, None)
        stats.shared[name] = owner
    owners = sorted(name for name in stats.linears if name not in shared)
    counts = torch.tensor([stats.counts.get(name, 0) for name in owners], dtype=torch.float64, device=stats.device)
    dist.all_reduce(counts)
    for name, count in zip(owners, counts.tolist()):
        stats.counts[name] = int(count)
    for table, op, wanted in ((stats.sums, dist.ReduceOp.SUM, stats.want["hessian"]),
                              (stats.absmax, dist.ReduceOp.MAX, stats.want["absmax"]),
                              (stats.abssum, dist.ReduceOp.SUM, stats.want["abssum"])):
        if not wanted:
            continue
        for name in owners:
            if name not in table:
                width = stats.linears[name].in_features
                shape = (width, width) if table is stats.sums else (width,)
                table[name] = torch.zeros(shape, dtype=torch.float32, device=stats.device)
            dist.all_reduce(table[name], op=op)
    for name in owners:  # no rank saw it: as a one-rank run, no entry (owner() then says so)
        if stats.counts[name] == 0:
            for table in (stats.sums, stats.absmax, stats.abssum, stats.counts):
                table.pop(name, None)


def broadcast_quantized(modules: list[QuantizedLinear | None], likes: list[torch.nn.Linear], owner: int, scheme,
                        device: torch.device) -> list[QuantizedLinear]:
    """The owner's quantized linears of one group on every rank: their grid values, scales, zero points and NVFP4
    global scales sent from `owner` (their shapes and dtypes first, once for the group); the others build the same
    modules around them (`likes`: the float linears they replace, for their biases)."""
    names = ("weight_q", "weight_scale", "weight_zero_point", "weight_global_scale")
    mine = dist.get_rank() == owner
    specs: list = [None]
    if mine:
        specs = [[[None if getattr(m, n) is None else (tuple(getattr(m, n).shape), getattr(m, n).dtype) for n in names]
                  for m in modules]]
    dist.broadcast_object_list(specs, src=owner)
    built = []
    for module, like, spec in zip(modules, likes, specs[0]):
        tensors = []
        for name, shape_dtype in zip(names, spec):
            if shape_dtype is None:
                tensors.append(None)
                continue
            tensor = getattr(module, name).detach().to(device).contiguous() if mine else torch.empty(
                shape_dtype[0], dtype=shape_dtype[1], device=device)
            # Sent as bytes: not every backend carries every dtype (FP8).
            dist.broadcast(tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor, src=owner)
            tensors.append(tensor)
        q, scale, zero_point, global_scale = tensors
        built.append(module if mine else QuantizedLinear.from_weight(like.weight, like.bias, scheme, q, scale, zero_point,
                                                                     global_scale=global_scale))
    return built


def gather_notes(notes: list[str]) -> list[str]:
    """Every rank's notes, rank by rank."""
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, notes)
    return [note for rank_notes in gathered for note in rank_notes]


def peak_gpu_bytes_per_rank(world: World, device: torch.device) -> list[int] | None:
    """Each rank's peak GPU memory (the allocator's reserved bytes), rank by rank; None on CPUs. A collective: every
    rank of several calls it at the same point."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_reserved(device)
    if not world.several:
        return [peak]
    gathered: list[int | None] = [None] * world.size
    dist.all_gather_object(gathered, peak)
    return gathered
