"""A small stand-in MoE model for routing tests: the contract's surface (moe_blocks(), block.router
returning (topk_ids_TK, topk_weights_TK, router_logits_TE), forward(input_ids_BT, cache, valid_BT))
and nothing else. Each block adds a small linear map of x to the residual (``mix``; 0 keeps the
hidden state unchanged, so a later router sees exactly what an earlier one saw)."""
import torch
from torch import nn


class StandinRouter(nn.Module):
    def __init__(self, d, e, k):
        super().__init__()
        self.gate = nn.Linear(d, e, bias=False)
        self.k = k

    def forward(self, x_TD):
        logits_TE = self.gate(x_TD).float()
        w_TK, ids_TK = torch.softmax(logits_TE, -1).topk(self.k, dim=-1)
        return ids_TK, w_TK, logits_TE


class StandinBlock(nn.Module):
    def __init__(self, d, e, k, mix):
        super().__init__()
        self.router = StandinRouter(d, e, k)
        self.proj = nn.Linear(d, d, bias=False)
        self.mix = mix

    def forward(self, x_TD):
        ids, w, _ = self.router(x_TD)
        return x_TD + self.mix * torch.tanh(self.proj(x_TD)) * w.sum(-1, keepdim=True)


class StandinCache:
    def __init__(self, batch_size):
        self.lengths = torch.zeros(batch_size, dtype=torch.long)

    def advance(self, valid_BT, T):
        self.lengths += T if valid_BT is None else valid_BT.sum(1)


class StandinMoE(nn.Module):
    def __init__(self, vocab=50, d=16, layers=4, experts=8, k=2, mix=0.5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(StandinBlock(d, experts, k, mix) for _ in range(layers))

    def moe_blocks(self):
        return list(self.blocks)

    def forward(self, input_ids_BT, cache=None, valid_BT=None):
        B, S = input_ids_BT.shape
        x = self.embed(input_ids_BT).reshape(B * S, -1)  # every token, padding included, like moe.model
        for b in self.blocks:
            x = b(x)
        if cache is not None:
            cache.advance(valid_BT, S)
        return x.reshape(B, S, -1)
