"""Differentiable collectives with uneven sizes, over any torch.distributed group (gloo or NCCL).

Each is an autograd Function whose backward is the adjoint collective:
    all_to_all_v   <->  all_to_all_v with the splits swapped
    all_gather_v   <->  reduce_scatter_v (sum of every rank's gradient for my chunk)
    reduce_scatter_v <-> all_gather_v
Built on ``all_to_all_single`` alone, which gloo and NCCL both implement for uneven splits.
Row counts are plain Python ints known on both sides (exchanged beforehand by the caller).

A gloo group with GPU tensors (ranks sharing one GPU, EPConfig.comm='gloo': NCCL refuses two ranks
on one device) moves them through host memory: ``all_to_all_single``, ``all_reduce`` and ``broadcast`` are
torch.distributed's, staged where the group needs it, and every collective of the placement
runtime goes through them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def staged(t: torch.Tensor, group=None) -> bool:
    """Whether ``t`` must go through host memory for ``group``'s collectives (gloo and not a CPU tensor)."""
    return t.device.type != "cpu" and dist.get_backend(group) == "gloo"


def all_to_all_single(out: torch.Tensor, x: torch.Tensor, output_split_sizes=None, input_split_sizes=None,
                      group=None) -> None:
    """``dist.all_to_all_single``, through host memory for a gloo group with GPU tensors."""
    if not staged(x, group):
        dist.all_to_all_single(out, x, output_split_sizes=output_split_sizes,
                               input_split_sizes=input_split_sizes, group=group)
        return
    host = torch.empty(out.shape, dtype=out.dtype)
    dist.all_to_all_single(host, x.cpu(), output_split_sizes=output_split_sizes,
                           input_split_sizes=input_split_sizes, group=group)
    out.copy_(host)


def _in_place(collective, t: torch.Tensor, group, **kw) -> None:
    """An in-place collective on ``t``, through host memory where the group needs it."""
    if not staged(t, group):
        collective(t, group=group, **kw)
        return
    host = t.cpu()
    collective(host, group=group, **kw)
    t.copy_(host)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> None:
    """In-place ``dist.all_reduce``, through host memory for a gloo group with GPU tensors."""
    _in_place(dist.all_reduce, t, group, op=op)


def broadcast(t: torch.Tensor, group=None) -> None:
    """In-place ``dist.broadcast`` from the group's first rank, through host memory for a gloo group with GPU tensors."""
    _in_place(dist.broadcast, t, group, group_src=0)


def _a2a(x: torch.Tensor, in_splits: list[int], out_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, in_splits, out_splits, group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        return _a2a(x, in_splits, out_splits, group)

    @staticmethod
    def backward(ctx, g):
        in_splits, out_splits = ctx.splits
        return _a2a(g, out_splits, in_splits, ctx.group), None, None, None


def all_to_all_v(x: torch.Tensor, in_splits: list[int], out_splits: list[int], group=None) -> torch.Tensor:
    """Send rows ``x[sum(in_splits[:j]) : ...]`` to rank j; receive ``out_splits[j]`` rows from rank j."""
    return _AllToAllV.apply(x, list(in_splits), list(out_splits), group)


def _reduce_scatter(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    rank = dist.get_rank(group)
    world = len(sizes)
    recv = _a2a(x, sizes, [sizes[rank]] * world, group)  # every rank's copy of my chunk
    return recv.view((world, sizes[rank]) + tuple(x.shape[1:])).sum(0)


def _all_gather(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    world = len(sizes)
    return _a2a(x.repeat((world,) + (1,) * (x.dim() - 1)), [x.shape[0]] * world, sizes, group)


class _AllGatherV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _all_gather(x, sizes, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.sizes, ctx.group), None, None


class _ReduceScatterV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _reduce_scatter(x, sizes, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.sizes, ctx.group), None, None


def all_gather_v(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (rank j holds ``sizes[j]`` rows) along dim 0."""
    return _AllGatherV.apply(x, list(sizes), group)


def reduce_scatter_v(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Sum ``x`` over ranks and keep my chunk (``sizes[rank]`` rows, chunks in rank order)."""
    return _ReduceScatterV.apply(x, list(sizes), group)


def exchange_counts(send_counts: torch.Tensor, group=None) -> torch.Tensor:
    """All-to-all of one int per destination: how many rows each rank will send me."""
    recv = torch.empty_like(send_counts)
    all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


def gather_sizes(n: int, device, group=None) -> list[int]:
    """Every rank's row count (one small all-gather)."""
    world = dist.get_world_size(group)
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return [int(o) for o in out]
