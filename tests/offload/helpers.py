"""Tiny models and a greedy decode loop for the offload tests.

The model is moe's MoEForCausalLM (MoEConfig.tiny) when the model package provides it; otherwise a
stand-in with the same contract (moe_blocks(), block.router -> (ids, weights, logits),
block.experts(x_TD, ids_TK, w_TK) with w13/w2 and `backend`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from kernels import get_backend


def _real_model(model_type: str, **overrides):
    try:
        from moe.config import MoEConfig
        from moe.model import MoEForCausalLM
    except ImportError:
        return None
    cfg = MoEConfig.tiny(model_type, **overrides)
    torch.manual_seed(0)
    return MoEForCausalLM(cfg, dtype=torch.float32)


class _Router(nn.Module):
    def __init__(self, D, E, K):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.top_k = K

    def forward(self, x_TD):
        logits_TE = self.gate(x_TD).float()
        w_TK, ids_TK = torch.softmax(logits_TE, -1).topk(self.top_k, dim=-1)
        return ids_TK, w_TK / w_TK.sum(-1, keepdim=True), logits_TE


class _Experts(nn.Module):
    def __init__(self, E, D, I):
        super().__init__()
        self.w13 = nn.Parameter(torch.randn(E, 2 * I, D) * 0.2)
        self.w2 = nn.Parameter(torch.randn(E, D, I) * 0.2)
        self.backend = "torch"

    def forward(self, x_TD, ids_TK, w_TK):
        return get_backend(self.backend)(x_TD, self.w13, self.w2, ids_TK, w_TK)


class _Block(nn.Module):
    def __init__(self, i, D, E, K, I):
        super().__init__()
        self.layer_idx = self.moe_index = i
        self.norm = nn.LayerNorm(D)
        self.router, self.experts = _Router(D, E, K), _Experts(E, D, I)
        self.shared_experts = self.shared_expert_gate = None

    def forward(self, x_TD):
        h = self.norm(x_TD)
        ids, w, _ = self.router(h)
        return x_TD + self.experts(h, ids, w)


class StandInLM(nn.Module):
    """Embedding, MoE blocks with residuals, LM head; no attention (state-free decode)."""

    def __init__(self, vocab=64, D=16, E=8, K=2, I=12, layers=3):
        super().__init__()
        self.config = type("Cfg", (), dict(num_experts_per_tok=K, num_experts=E, vocab_size=vocab))()
        self.embed = nn.Embedding(vocab, D)
        self.blocks = nn.ModuleList(_Block(i, D, E, K, I) for i in range(layers))
        self.head = nn.Linear(D, vocab, bias=False)

    def moe_blocks(self):
        return list(self.blocks)

    def forward(self, ids_BT, cache=None, valid_BT=None):
        B, T = ids_BT.shape
        x = self.embed(ids_BT).reshape(B * T, -1)
        for b in self.blocks:
            x = b(x)
        return self.head(x).reshape(B, T, -1)

    def new_cache(self, batch_size, max_len):
        return None


def tiny_model(model_type: str = "mixtral", **overrides) -> nn.Module:
    """float32 tiny model, real if available (8 experts, top-2)."""
    m = _real_model(model_type, **overrides)
    if m is None:
        torch.manual_seed(0)
        m = StandInLM()
    return m.eval()


def twin(model):
    return copy.deepcopy(model)


@torch.no_grad()
def greedy(model, prompt: list[int], steps: int, max_len: int = 64):
    """(generated tokens, logits of every step [steps+1, V]); a KV cache when the model has one."""
    dev = next(model.parameters()).device
    cache = model.new_cache(1, max_len)
    ids = torch.tensor([prompt], device=dev)
    if cache is None:  # the stand-in keeps no state: feed the whole sequence each step
        seq, out_logits, toks = list(prompt), [], []
        for _ in range(steps + 1):
            lg = model(torch.tensor([seq], device=dev))[0, -1]
            out_logits.append(lg.cpu())
            t = int(lg.argmax())
            toks.append(t)
            seq.append(t)
        return toks, torch.stack(out_logits)
    lg = model(ids, cache=cache)[0, -1]
    out_logits, toks = [lg.cpu()], [int(lg.argmax())]
    for _ in range(steps):
        lg = model(torch.tensor([[toks[-1]]], device=dev), cache=cache)[0, -1]
        out_logits.append(lg.cpu())
        toks.append(int(lg.argmax()))
    return toks, torch.stack(out_logits)


def offloaded(model, **kw):
    """apply_offload on a twin of `model`, on the CPU, with rates that make copying and computing a
    tiny expert on the CPU cost about the same, so that both miss paths get used."""
    from offload import OffloadConfig, apply_offload
    kw.setdefault("device", "cpu")
    kw.setdefault("calibrate", False)
    kw.setdefault("copy_gbps", 1e-3)
    kw.setdefault("cpu_gflops", 1e-3)
    return apply_offload(twin(model), OffloadConfig(**kw))
