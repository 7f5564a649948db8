"""Expert math: grouped-GEMM MoE kernels and their plain PyTorch reference.

The model never calls Triton directly: it asks for a backend by name.

    from kernels import moe_experts
    y_TD = moe_experts(x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK, backend="torch")

Modules: reference.py (the plain PyTorch expert math, backend "torch"); fused_moe.py (backend
"triton": the autograd function over the Triton kernels); align.py (tokens sorted by expert and
padded to the row block, with no host sync); grouped_gemm.py (the Triton kernels); fused_decode.py
(one-token calls: both projections in one grid, then a fixed-order sum); launch_config.py
(tuned launch configs, read from configs/*.json, and the default for other shapes and GPUs).

The "triton" backend is CUDA-graph capturable when called without autograd (under torch.no_grad or
inference_mode); with grad enabled on any input it also saves what the backward pass needs.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .reference import check_moe_inputs, expert_mlp_reference, moe_experts_reference

BACKENDS = ("torch", "triton")


def get_backend(name: str) -> Callable[..., torch.Tensor]:
    """The expert function of a backend: f(x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK) -> y_TD."""
    if name == "torch":
        return moe_experts_reference
    if name == "triton":
        from .fused_moe import fused_moe  # imported lazily: Triton is only needed when asked for
        return fused_moe
    raise ValueError(f"unknown expert backend {name!r}; choose one of {BACKENDS}")


def resolve_backend(name: str, device) -> str:
    """A backend name with 'auto' made concrete: 'triton' (the fused kernels; decode steps capture as CUDA graphs)
    on a CUDA device, else 'torch' (the reference, which runs anywhere). Other names are checked and kept:
    'triton' off a CUDA device is refused unless TRITON_INTERPRET=1 (the interpreter, very slow)."""
    dev = torch.device(device)
    if name == "auto":
        return "triton" if dev.type == "cuda" else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown expert backend {name!r}; choose one of {BACKENDS} or 'auto'")
    if name == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' needs a CUDA device, not {dev} (or TRITON_INTERPRET=1, very slow): "
                         "use backend 'auto' or 'torch' there")
    return name


def inference_on_cuda(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether an inference-only Triton kernel (norm, router, attention prep, projections) may take
    x: on CUDA, and no gradient asked of x or of the module's params."""
    return x.is_cuda and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)))


def moe_experts(x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK, backend: str = "torch") -> torch.Tensor:
    return get_backend(backend)(x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK)


__all__ = ["BACKENDS", "get_backend", "resolve_backend", "moe_experts", "moe_experts_reference", "expert_mlp_reference",
           "check_moe_inputs"]
