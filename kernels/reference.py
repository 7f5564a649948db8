"""Plain PyTorch reference of the MoE expert computation (SwiGLU experts).

Every fast path in kernels/ is tested against these functions; the model's "torch" backend is
this file.

Shape legend: T = tokens, D = hidden size, E = experts, I = expert ffn size, J = 2*I,
K = experts per token.

    x_TD              activations, token order
    w13_EJD           gate and up projections stacked: rows [0, I) gate, [I, 2I) up
                      (the Hugging Face fused ``experts.gate_up_proj`` layout)
    w2_EDI            down projection (``experts.down_proj``)
    topk_ids_TK       expert of each (token, slot); -1 = not computed here, contributes zero
    topk_weights_TK   routing weight of each (token, slot)

    y_TD = sum_k w[t,k] * W2[e] @ (silu(Wg[e] @ x_t) * (Wu[e] @ x_t)),  e = ids[t,k]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_moe_inputs(x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK) -> None:
    """Shape checks shared by every backend; raises ValueError naming the bad value."""
    if x_TD.dim() != 2:
        raise ValueError(f"x must be [tokens, hidden], got shape {tuple(x_TD.shape)}")
    if w13_EJD.dim() != 3 or w2_EDI.dim() != 3:
        raise ValueError(f"w13 must be [E, 2I, D] and w2 [E, D, I]; got {tuple(w13_EJD.shape)} and {tuple(w2_EDI.shape)}")
    E, J, D = w13_EJD.shape
    if J % 2:
        raise ValueError(f"w13's second dim (gate+up = 2I) must be even, got {J}")
    if x_TD.shape[1] != D:
        raise ValueError(f"hidden size of x ({x_TD.shape[1]}) != hidden size of w13 ({D})")
    if tuple(w2_EDI.shape) != (E, D, J // 2):
        raise ValueError(f"w2 must be [E, D, I] = {(E, D, J // 2)}, got {tuple(w2_EDI.shape)}")
    if topk_ids_TK.shape != topk_weights_TK.shape or topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids_TK.shape)} and topk_weights {tuple(topk_weights_TK.shape)} "
                         f"must both be [tokens={x_TD.shape[0]}, top_k]")


def expert_mlp_reference(x_ND: torch.Tensor, w13_JD: torch.Tensor, w2_DI: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU MLP: W2 @ (silu(Wg x) * (Wu x))."""
    I = w2_DI.shape[1]
    # F.linear, not x @ w.t(): the same numbers, but on the CPU the transposed-view matmul runs
    # about 2x slower (measured on the dev machine, bf16 and fp32), and this is also the CPU
    # expert path of offloading and of the CPU hosts
    h_NJ = F.linear(x_ND, w13_JD)
    return F.linear(F.silu(h_NJ[:, :I]) * h_NJ[:, I:], w2_DI)


def moe_experts_reference(x_TD: torch.Tensor, w13_EJD: torch.Tensor, w2_EDI: torch.Tensor,
                          topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Loop over experts; differentiable in every input (routing weights included)."""
    check_moe_inputs(x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK)
    T, K = topk_ids_TK.shape
    E = w13_EJD.shape[0]
    y_TD = torch.zeros_like(x_TD)
    flat_ids = topk_ids_TK.reshape(-1)
    flat_w = topk_weights_TK.reshape(-1)
    # which experts are used at all: one host sync, acceptable for a reference
    for e in torch.unique(flat_ids[flat_ids >= 0]).tolist():
        if e >= E:
            raise ValueError(f"expert id {e} out of range for {E} experts")
        pos = (flat_ids == e).nonzero(as_tuple=True)[0]  # positions in the flattened [T*K]
        tok = pos // K
        out = expert_mlp_reference(x_TD[tok], w13_EJD[e], w2_EDI[e])
        y_TD = y_TD.index_add(0, tok, out * flat_w[pos, None].to(out.dtype))
    return y_TD
