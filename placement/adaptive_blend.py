"""Blends of expert parallelism with data or tensor parallelism in groups of ranks (Tutel's r).

Shape legend: T = this rank's tokens, D = hidden, W = ranks, g = ranks per group, G = W / g groups,
R = (token, slot, slice) rows, P = (token, destination rank) pairs (a token is sent once per
rank it visits, however many of its rows that rank serves), Uw = weight units per rank.

Both blends run from the one unit layout of ``adaptive.ShardLayout`` and move no weight for
good: the ranks are cut into G groups of g consecutive ranks; rank (group γ, position p) talks
by all-to-all only to the ranks at position p of the other groups, and within its own group:

  "ep+dp" (g)  the group all-gathers its members' weight units (data parallel inside the group),
               then each token goes to position p of every group whose units it needs (expert
               parallel across groups). g = 1 is expert parallel, g = W is data parallel. With
               fewer experts than ranks (each expert sliced over S = W/E ranks) this is Tutel's
               r = S/g: r = 1 gathers whole experts (DP+EP), r = S keeps the slices (slicing+EP).
  "ep+tp" (g)  each token goes to position p of every group it needs; the group all-gathers
               the tokens it received, each member computes its own units for all of them and a
               reduce-scatter sums the partial outputs back (tensor parallel inside the group).
               g = 1 is expert parallel, g = W is the "tp" strategy.

Every collective is a differentiable ``all_to_all_v`` over the layer's process group (zero rows
to ranks outside the pattern), so backward runs the adjoint collectives and every rank runs the
same collectives in the same order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import all_to_all_v, exchange_counts

BLENDS = ("ep+dp", "ep+tp")


def group_sizes(world: int) -> list[int]:
    """Ranks per group that divide the world (1 and W included)."""
    return [g for g in range(1, world + 1) if world % g == 0]


class _Pairs:
    """Tokens sent once per destination rank, with the rows (unit, weight) each pair carries.

    After construction, on the receiving side: ``x_in`` [P_in, D] the received tokens,
    ``row_pair`` [R_in] which received token each received row belongs to, ``unit`` [R_in] the
    global unit of the row, ``weight`` [R_in] its routing weight (differentiable)."""

    def __init__(self, x_TD, tok_R, unit_R, weight_R, dest_R, world: int, group):
        T = max(x_TD.shape[0], 1)
        dev = x_TD.device
        # one pair per (destination, token); unique() sorts, so pairs come grouped by destination
        uniq, inv = torch.unique(dest_R * T + tok_R, return_inverse=True)
        self.pair_tok = uniq % T
        send_p = torch.bincount(uniq // T, minlength=world)
        order = torch.argsort(dest_R, stable=True)
        send_r = torch.bincount(dest_R, minlength=world)
        pair_start = torch.cumsum(send_p, 0) - send_p
        # a row names its pair by the index inside the block sent to its destination
        local_pair = inv[order] - pair_start[dest_R[order]]
        recv = exchange_counts(torch.stack([send_p, send_r], dim=1), group)  # [W, 2]
        counts = torch.cat([send_p, send_r, recv[:, 0], recv[:, 1]]).tolist()  # one host sync
        self.send_p, self.send_r = counts[:world], counts[world:2 * world]
        self.recv_p, self.recv_r = counts[2 * world:3 * world], counts[3 * world:]
        self.x_in = all_to_all_v(x_TD[self.pair_tok], self.send_p, self.recv_p, group)
        meta = all_to_all_v(torch.stack([local_pair, unit_R[order]], dim=1), self.send_r, self.recv_r, group)
        self.weight = all_to_all_v(weight_R[order], self.send_r, self.recv_r, group)
        recv_p_t = torch.tensor(self.recv_p, device=dev)
        src = torch.repeat_interleave(torch.arange(world, device=dev), torch.tensor(self.recv_r, device=dev))
        self.row_pair = meta[:, 0] + (torch.cumsum(recv_p_t, 0) - recv_p_t)[src]
        self.unit = meta[:, 1]
        self.group = group

    def combine(self, y_in_PD: torch.Tensor, T: int) -> torch.Tensor:
        """Send each pair's output back to its token's rank and sum into [T, D]."""
        y_back = all_to_all_v(y_in_PD, self.recv_p, self.send_p, self.group)
        return y_back.new_zeros((T, y_back.shape[1])).index_add(0, self.pair_tok, y_back)


def _group_gather(x: torch.Tensor, sizes: list[int], members: range, world: int, group) -> torch.Tensor:
    """All-gather inside ``members`` (rows of member j = sizes[j]); the adjoint is a reduce-scatter."""
    g = len(members)
    if g == 1:  # every rank has the same g, so skipping keeps the ranks' collectives matched
        return x
    mine = x.shape[0]
    send = [mine if j in members else 0 for j in range(world)]
    recv = [sizes[j] if j in members else 0 for j in range(world)]
    return all_to_all_v(x.repeat((g,) + (1,) * (x.dim() - 1)), send, recv, group)


def _group_reduce_scatter(x: torch.Tensor, sizes: list[int], members: range, rank: int, world: int,
                          group) -> torch.Tensor:
    """Sum ``x`` (member j's chunk = sizes[j] rows, in member order) over ``members``; keep mine."""
    g = len(members)
    if g == 1:
        return x
    send = [sizes[j] if j in members else 0 for j in range(world)]
    recv = [sizes[rank] if j in members else 0 for j in range(world)]
    out = all_to_all_v(x, send, recv, group)
    return out.view((g, sizes[rank]) + tuple(x.shape[1:])).sum(0)


def blend_forward(layer, x_TD: torch.Tensor, tok_R, unit_R, weight_R, kind: str, g: int) -> torch.Tensor:
    """Run one blend for ``layer`` (an AdaptiveMoEExperts) on rows already capacity-filtered."""
    W, rank, group = layer.world, layer.rank, layer.group
    Uw = layer.layout.units_per_rank
    if kind not in BLENDS:
        raise ValueError(f"unknown blend {kind!r}; choose one of {BLENDS}")
    if g < 1 or W % g:
        raise ValueError(f"ranks per group ({g}) must divide the {W} ranks; choose one of {group_sizes(W)}")
    base, p = (rank // g) * g, rank % g
    members = range(base, base + g)
    dest_R = (unit_R // Uw // g) * g + p  # position p of the group that holds the unit
    pairs = _Pairs(x_TD, tok_R, unit_R, weight_R, dest_R, W, group)
    dt = x_TD.dtype
    if kind == "ep+dp":
        w13 = _group_gather(layer.w13, [Uw] * W, members, W, group)  # the group's units, in order
        w2 = _group_gather(layer.w2, [Uw] * W, members, W, group)
        y_R = layer._compute(pairs.x_in[pairs.row_pair], pairs.unit - base * Uw, pairs.weight.to(dt), w13, w2)
        y_P = pairs.x_in.new_zeros(pairs.x_in.shape).index_add(0, pairs.row_pair, y_R)
        return pairs.combine(y_P, x_TD.shape[0])
    # ep+tp: every member computes its own units for all tokens the group received
    sizes_p, sizes_r = [0] * W, [0] * W
    sizes_p[rank], sizes_r[rank] = pairs.x_in.shape[0], pairs.unit.shape[0]
    if g > 1:  # the members' received counts (one tiny all-gather)
        n = torch.tensor([sizes_p[rank], sizes_r[rank]], device=x_TD.device)
        everyone = [torch.empty_like(n) for _ in range(W)]
        dist.all_gather(everyone, n, group=group)
        both = torch.stack(everyone).tolist()
        sizes_p, sizes_r = [b[0] for b in both], [b[1] for b in both]
    x_grp = _group_gather(pairs.x_in, sizes_p, members, W, group)
    offset = sum(sizes_p[base:rank])  # where my received tokens sit in x_grp
    meta = _group_gather(torch.stack([pairs.row_pair + offset, pairs.unit], dim=1), sizes_r, members, W, group)
    w_grp = _group_gather(pairs.weight, sizes_r, members, W, group)
    mine = (meta[:, 1] // Uw) == rank
    row_pair, unit = meta[mine, 0], meta[mine, 1] - rank * Uw
    y_R = layer._compute(x_grp[row_pair], unit, w_grp[mine].to(dt), layer.w13, layer.w2)
    partial = x_grp.new_zeros(x_grp.shape).index_add(0, row_pair, y_R)
    y_P = _group_reduce_scatter(partial, sizes_p, members, rank, W, group)
    return pairs.combine(y_P, x_TD.shape[0])
