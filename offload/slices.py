"""Expert slices: one expert cut along its ffn dimension into G units that offloading treats as experts.

An expert's SwiGLU output is a sum over its ffn dimension I:

    y = sum_i w2[:, i] * silu(w1[i] . x) * (w3[i] . x)

so the columns [g*C, (g+1)*C) (C = I / G) form a complete SwiGLU expert of width C — unit g —
and the G units' outputs, each weighted by the token's routing weight for the expert, add up
to the expert's. With G > 1 the host store holds units (unit u = expert u // G, slice u % G),
each contiguous in pinned memory, and the cache, the policies, the kernel and the CPU path all
work over units unchanged: a token routed to expert e is routed to units e*G .. e*G+G-1 with
the same weight.

Why: at batch 1 a decode step misses about one expert per layer, so sharing whole misses
between the copy engine and the CPU (offload.cost_model.split) finds nothing to share. With
G = 2 one miss is two unit misses: one copied over PCIe while the CPU computes the other, both
done in about half the time of one whole copy; and a unit the CPU computed is not copied, so
the copy engine's work drops too (at the price of that unit staying a miss next time).

Layout of a unit in the store (what one slot of the cache holds):
    w13 unit [2C, D] = gate rows [g*C, (g+1)*C) then up rows [I + g*C, I + (g+1)*C)
    w2  unit [D, C]  = columns [g*C, (g+1)*C) of w2

Shape legend: E = experts, G = slices per expert, U = E*G units, C = I/G, J = 2I, D = hidden,
T = tokens, K = experts per token.
"""
from __future__ import annotations

import numpy as np
import torch

from .pinned import host_empty


def check_slices(ffn: int, slices: int) -> int:
    """C = ffn / slices, or a ValueError naming the fix."""
    if not isinstance(slices, int) or slices < 1:
        raise ValueError(f"expert_slices must be an integer >= 1, got {slices!r}")
    if ffn % slices:
        raise ValueError(f"expert_slices={slices} must divide the experts' ffn size {ffn}; "
                         f"use one of {[g for g in range(1, min(ffn, 16) + 1) if ffn % g == 0]}")
    return ffn // slices


def units_w13(w13_EJD: torch.Tensor, slices: int, dtype: torch.dtype | None = None, pin: bool = False
              ) -> torch.Tensor:
    """[E*G, 2C, D]: every expert's gate/up rows regrouped unit by unit, in one copy (converted to
    `dtype` on the way, into pinned memory with `pin`)."""
    E, J, D = w13_EJD.shape
    G, C = slices, check_slices(J // 2, slices)
    out = host_empty((E * G, 2 * C, D), dtype or w13_EJD.dtype, pin)
    out.view(E, G, 2, C, D).copy_(w13_EJD.reshape(E, 2, G, C, D).permute(0, 2, 1, 3, 4))  # [E, G, gate/up, C, D]
    return out


def units_w2(w2_EDI: torch.Tensor, slices: int, dtype: torch.dtype | None = None, pin: bool = False) -> torch.Tensor:
    """[E*G, D, C]: every expert's w2 columns regrouped unit by unit, in one copy (as units_w13)."""
    E, D, I = w2_EDI.shape
    G, C = slices, check_slices(I, slices)
    out = host_empty((E * G, D, C), dtype or w2_EDI.dtype, pin)
    out.view(E, G, D, C).copy_(w2_EDI.reshape(E, D, G, C).permute(0, 2, 1, 3))  # [E, G, D, C]
    return out


def unit_of(w13_JD: torch.Tensor, w2_DI: torch.Tensor, g: int, slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit g of one expert (new contiguous tensors): for stores that read experts one by one (disk)."""
    I = w2_DI.shape[1]
    C = check_slices(I, slices)
    a, b = g * C, (g + 1) * C
    return torch.cat([w13_JD[a:b], w13_JD[I + a:I + b]], 0), w2_DI[:, a:b].contiguous()


def expand_ids(ids_TK: np.ndarray, slices: int) -> np.ndarray:
    """[T, K*G] unit ids: expert e -> e*G .. e*G+G-1 (in that order), -1 (no expert) -> -1."""
    ids = np.asarray(ids_TK)
    if slices == 1:
        return ids
    u = ids[..., None] * slices + np.arange(slices)
    u = np.where(ids[..., None] < 0, -1, u)
    return u.reshape(*ids.shape[:-1], ids.shape[-1] * slices)


def expand_weights(w_TK: torch.Tensor, slices: int) -> torch.Tensor:
    """[T, K*G]: each expert's routing weight repeated for its G units (matching expand_ids)."""
    return w_TK if slices == 1 else w_TK.repeat_interleave(slices, dim=-1)


def units_of(experts, slices: int) -> list[int]:
    """Every unit of the given experts, expert by expert."""
    return [int(e) * slices + g for e in experts for g in range(slices)]


def unit_trace(trace, slices: int):
    """The RoutingTrace of units (expert ids expanded): what the Belady oracle evicts by."""
    if slices == 1:
        return trace
    import dataclasses
    w = None if trace.weights is None else np.repeat(trace.weights, slices, axis=-1)
    return dataclasses.replace(trace, expert_ids=expand_ids(trace.expert_ids, slices).astype(trace.expert_ids.dtype),
                               num_experts=trace.num_experts * slices, weights=w)
