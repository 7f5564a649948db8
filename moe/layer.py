"""MoELayer: a drop-in Mixture-of-Experts feed-forward layer for any PyTorch model.

    layer = MoELayer.simple(hidden_size=512, num_experts=8, top_k=2, intermediate_size=1024)
    y, aux = layer(x)                      # x [..., D] -> y [..., D]
    loss = task_loss + aux.loss(layer.balance)

It composes the model's own ``SparseMoEBlock`` (router from ``routing.gating``, experts through
the ``kernels`` backend seam, optional shared experts), so a layer trained here is the same
computation as a decoder layer of ``moe.MoEForCausalLM``. Training rules come from
``moe.losses`` through the same router hooks the trainer puts on a whole model:

    x_ND -> [jitter] -> router -> (topk_ids_NK, topk_weights_NK, logits_NE)
         -> [capacity: overflow slots -> -1] -> experts (+ shared) -> y_ND
    aux = MoEAux(lb_loss, z_loss, load_LE, dropped, capacity, tokens)

Nothing is kept between calls except the router's correction bias (DeepSeek-V3 aux-loss-free
balancing), which moves after each training forward when ``balance.bias_rate > 0``.

Shape legend: N = tokens, D = hidden size, E = experts, K = experts per token, I = expert ffn.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .config import MoEConfig
from .layers import SparseMoEBlock
from .losses import BalanceConfig, MoEAux, RouterAuxCollector


def init_moe_block_(block: nn.Module, std: float = 0.02, out_std: float | None = None,
                    generator: torch.Generator | None = None) -> None:
    """Initialise a SparseMoEBlock in place: normal(std) for router, gate/up projections, shared
    experts; out_std (default std) for the down projections, so deep stacks can scale it down."""
    out_std = std if out_std is None else out_std
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.dim() < 2:
                continue
            s = out_std if name.endswith(("w2", "down_proj.weight")) else std
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(s).to(p.dtype))


class MoELayer(nn.Module):
    """Router + experts (+ shared experts) returning ``(y, aux)``; see the module docstring."""

    def __init__(self, cfg: MoEConfig, balance: BalanceConfig = BalanceConfig(), backend: str = "torch",
                 layer_idx: int = 0, dtype: torch.dtype | None = None, device=None, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.balance = balance
        self.block = SparseMoEBlock(cfg, layer_idx, 0, backend=backend, dtype=dtype, device=device)
        init_moe_block_(self.block, init_std)
        # the hooks live on this layer's own router; they hold no state between forward calls
        self._collector = RouterAuxCollector(self, balance)

    @classmethod
    def simple(cls, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, *,
               num_shared_experts: int = 0, scoring_func: str = "softmax", norm_topk_prob: bool = True,
               balance: BalanceConfig = BalanceConfig(), backend: str = "torch", dtype=None, device=None,
               init_std: float = 0.02) -> "MoELayer":
        """A layer from plain sizes.

        scoring_func "softmax": Mixtral-style softmax top-k (renormalised if norm_topk_prob);
        "sigmoid": DeepSeek-V3-style sigmoid scores with the correction bias that aux-loss-free
        balancing moves. num_shared_experts > 0 adds always-on experts of the same size.
        """
        if scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")
        common = dict(vocab_size=1, hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=1,
                      num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=intermediate_size,
                      norm_topk_prob=norm_topk_prob)
        if scoring_func == "sigmoid" or num_shared_experts:
            # DeepSeek-V3's block: sigmoid or softmax scores, n shared experts; one group = plain top-k
            method = "noaux_tc" if scoring_func == "sigmoid" else "greedy"
            if method == "noaux_tc" and num_experts < 2:
                raise ValueError("sigmoid (noaux_tc) routing needs num_experts >= 2")
            cfg = MoEConfig(model_type="deepseek_v3", scoring_func=scoring_func, topk_method=method,
                            n_group=1 if method == "noaux_tc" else None,
                            topk_group=1 if method == "noaux_tc" else None,
                            n_shared_experts=num_shared_experts or None, **common)
        else:
            cfg = MoEConfig(model_type="mixtral", **common)
        balance = dataclasses.replace(balance, score_func=scoring_func)
        return cls(cfg, balance, backend, dtype=dtype, device=device, init_std=init_std)

    # the collector (and anything else that walks a model) finds the router through this
    def moe_blocks(self) -> list[SparseMoEBlock]:
        return [self.block]

    @property
    def router(self) -> nn.Module:
        return self.block.router

    @property
    def experts(self) -> nn.Module:
        return self.block.experts

    def set_backend(self, name: str) -> None:
        import kernels
        kernels.get_backend(name)  # raises ValueError on an unknown name
        self.block.experts.backend = name

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        D = self.cfg.hidden_size
        if x.shape[-1] != D:
            raise ValueError(f"MoELayer expects inputs [..., {D}], got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self.block(x.reshape(1, -1, D)).reshape(*lead, D)
        aux = self._collector.collect()
        if self.training and self.balance.bias_rate > 0:
            self._collector.update_bias()
        else:
            self._collector.pending_load = [None]  # loads of eval calls never move the bias
        return y, aux

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"hidden={c.hidden_size}, experts={c.num_experts}, top_k={c.num_experts_per_tok}, "
                f"ffn={c.moe_intermediate_size}, capacity_factor={self.balance.capacity_factor}")


def dense_mlp_from_single_expert(layer: MoELayer) -> nn.Module:
    """The dense SwiGLU MLP equal to a one-expert top-1 MoELayer (shares nothing: a copy)."""
    from .layers import MLP
    E, J, D = layer.experts.w13.shape
    if E != 1 or layer.cfg.num_experts_per_tok != 1:
        raise ValueError(f"only a 1-expert top-1 layer is a dense MLP; got {E} experts, top-{layer.cfg.num_experts_per_tok}")
    I = J // 2
    mlp = MLP(D, I, dtype=layer.experts.w13.dtype, device=layer.experts.w13.device)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(layer.experts.w13[0, :I])
        mlp.up_proj.weight.copy_(layer.experts.w13[0, I:])
        mlp.down_proj.weight.copy_(layer.experts.w2[0])
    return mlp


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
