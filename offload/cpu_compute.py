"""Compute missed experts on the CPU from the host store (Fiddler's idea), whole or one slice of
the ffn dimension, and how to share a step's misses between the copy engine and CPU hosts.

For a decode step a missed expert sees one or a few tokens: the CPU reads the expert once from
host memory at ~90 GB/s instead of pushing it over PCIe at 55 GB/s, so on the H200 host one
Mixtral expert costs about the same either way (ANCHORS.md) and the two run side by side.

The math is the plain reference (kernels.expert_mlp_reference), expert by expert, with the same
weighted combine as kernels.moe_experts_reference: the CPU-computed share of y_TD equals what
the reference computes for those experts.

Sub-expert split. An expert's output is a sum over its ffn dimension I:

    y = sum_i w2[:, i] * silu(w1[i] . x) * (w3[i] . x)

so columns [0, c) can be computed on the device (their weights copied over PCIe) and [c, I) on a
CPU host at the same time, and the two partial outputs add. `split_misses` chooses c for every
missed expert of a step (a water-filling: the copy engine and every host finish together) and
`expert_mlp_slice` is the plain reference of one slice.

Shape legend: T = tokens, D = hidden, K = experts per token, N = rows of one expert,
J = 2*I (gate rows then up rows), I = expert ffn size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import expert_mlp_reference

from .store import ExpertStore


def cpu_experts(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                experts: list[int], store: ExpertStore, layer: int) -> torch.Tensor:
    """y_TD (on the CPU) = the weighted sum over the (token, expert) pairs whose expert is in `experts`.

    All inputs are CPU tensors; x_TD in the store's dtype.
    """
    T, K = topk_ids_TK.shape
    y_TD = torch.zeros_like(x_TD)
    flat_ids = topk_ids_TK.reshape(-1)
    flat_w = topk_weights_TK.reshape(-1)
    for e in sorted(experts):
        pos = (flat_ids == e).nonzero(as_tuple=True)[0]
        if pos.numel() == 0:
            continue
        tok = pos // K
        w13_JD, w2_DI = store.get(layer, e)
        out = expert_mlp_reference(x_TD[tok], w13_JD, w2_DI)
        y_TD = y_TD.index_add(0, tok, out * flat_w[pos, None].to(out.dtype))
    return y_TD


def expert_mlp_slice(x_ND: torch.Tensor, w13_JD: torch.Tensor, w2_DI: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """The part of one expert's SwiGLU MLP over ffn columns [a, b): summed over a partition of
    [0, I) it is expert_mlp_reference(x, w13, w2). Reads only those columns' weights (gate rows
    [a, b), up rows [I+a, I+b), w2 columns [a, b): a strided view, no copy)."""
    I = w2_DI.shape[1]
    if not 0 <= a <= b <= I:
        raise ValueError(f"ffn slice [{a}, {b}) must lie in [0, {I}]")
    if a == 0 and b == I:
        return expert_mlp_reference(x_ND, w13_JD, w2_DI)
    g_NC = F.linear(x_ND, w13_JD[a:b])
    u_NC = F.linear(x_ND, w13_JD[I + a:I + b])
    return F.linear(F.silu(g_NC) * u_NC, w2_DI[:, a:b])


def expert_mlp_slice_t(x_ND: torch.Tensor, gate_CD: torch.Tensor, up_CD: torch.Tensor,
                       w2t_CD: torch.Tensor) -> torch.Tensor:
    """The same part from the slice's rows laid out [C, D] each (w2 transposed): what the device
    computes from the rows copied into its staging buffer."""
    return (F.silu(F.linear(x_ND, gate_CD)) * F.linear(x_ND, up_CD)) @ w2t_CD


@dataclass(frozen=True)
class Miss:
    """A missed expert of this step: host = the CPU host that computes its host part (any
    hashable: a tuple of hosts that divide it, offload.tiered's replicas); host_s = what
    computing all of it there costs (the cost model's cpu_s of its token count)."""
    expert: int
    host: object
    host_s: float


@dataclass(frozen=True)
class SliceSplit:
    """copy_cols[e] = c: columns [0, c) of expert e are copied to the device and computed there,
    [c, I) on its host (c == I: a whole copy, c == 0: all on the host). copy_s / host_s: the
    predicted busy time of the copy engine and of each host."""
    copy_cols: dict
    copy_s: float
    host_s: dict

    @property
    def makespan_s(self) -> float:
        return max([self.copy_s, *self.host_s.values()])


def split_misses(misses: list[Miss], copy_s: float, ffn: int, align: int = 128, copy_backlog_s: float = 0.0,
                 iters: int = 40) -> SliceSplit:
    """Share the step's misses between the copy engine and the hosts so that all finish together.

    copy_s: seconds to copy one whole expert; a slice costs its share of that (bytes). A slice of
    an expert costs its host the same share of host_s (the host reads only those columns, and the
    FLOPs per token scale with them too). copy_backlog_s: copies already queued ahead.

    Water-filling over a deadline T (bisection, the loads are monotone in T): every host keeps
    work up to T and hands the rest to the copy engine, the experts with the most tokens first
    (their host time per copied byte is largest), the last one in part; T is feasible when the
    copy engine's share fits in T too. The fractions are then rounded to `align` columns.
    """
    if copy_s <= 0 or ffn < 1 or align < 1:
        raise ValueError(f"copy_s ({copy_s}) must be > 0, ffn ({ffn}) and align ({align}) >= 1")
    if not misses:
        return SliceSplit({}, copy_backlog_s, {})
    by_host: dict[int, list[Miss]] = {}
    for m in misses:
        if m.host_s < 0:
            raise ValueError(f"host_s of expert {m.expert} must be >= 0, got {m.host_s}")
        by_host.setdefault(m.host, []).append(m)
    for ms in by_host.values():
        ms.sort(key=lambda m: (-m.host_s, m.expert))

    def shed(T: float) -> tuple[float, dict]:
        """Copy seconds needed so that no host works longer than T, and the copied fractions."""
        need, frac = copy_backlog_s, {}
        for ms in by_host.values():
            excess = sum(m.host_s for m in ms) - T
            for m in ms:
                if excess <= 0:
                    break
                f = 1.0 if m.host_s <= excess else excess / m.host_s
                frac[m.expert] = f
                need += f * copy_s
                excess -= f * m.host_s
        return need, frac

    lo, hi = 0.0, max(sum(m.host_s for m in ms) for ms in by_host.values())
    for _ in range(iters):
        mid = (lo + hi) / 2
        if shed(mid)[0] <= mid:
            hi = mid
        else:
            lo = mid
    _, frac = shed(hi)
    cols = {}
    for m in misses:
        c = int(round(frac.get(m.expert, 0.0) * ffn / align)) * align
        cols[m.expert] = min(max(c, 0), ffn)
    copy_t = copy_backlog_s + sum(c / ffn * copy_s for c in cols.values())
    host_t = {h: sum((1 - cols[m.expert] / ffn) * m.host_s for m in ms) for h, ms in by_host.items()}
    return SliceSplit(cols, copy_t, host_t)
