"""Compute missed experts on the CPU from the host store (Fiddler's idea).

For a decode step a missed expert sees one or a few tokens: the CPU reads the expert once from
host memory at ~90 GB/s instead of pushing it over PCIe at 55 GB/s, so on the H200 host one
Mixtral expert costs about the same either way (ANCHORS.md) and the two run side by side.

The math is the plain reference (kernels.expert_mlp_reference), expert by expert, with the same
weighted combine as kernels.moe_experts_reference: the CPU-computed share of y_TD equals what
the reference computes for those experts.

Shape legend: T = tokens, D = hidden, K = experts per token.
"""
from __future__ import annotations

import torch

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
