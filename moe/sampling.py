"""Sampling settings and the next-token sampler: greedy, temperature, top-k, top-p, per-request seeds.

Shape legend: R = rows being sampled (one per running request), V = vocabulary.

Each request may carry its own ``torch.Generator`` (made from ``SamplingParams.seed``), and every
row draws from its own generator alone, so the tokens a seeded request gets do not depend on
which other requests share its batch. A row samples by the exponential race (the argmax of
p / Exp(1) noise), which draws exactly from p, with no sort unless a row filters. Filtering
happens in sorted order (descending logits, stable sort): top-k keeps the first k ranks, then
top-p keeps the shortest prefix whose probability (after top-k, renormalised) reaches p — the
token that crosses p is kept, so at least one token always survives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 means greedy (argmax). top_k 0 and top_p 1 switch those filters off.
    ``stop`` strings end the output and are trimmed from it; ``stop_token_ids`` end it in
    addition to the tokenizer's end-of-sequence ids (unless ``ignore_eos``).
    """
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # set by __post_init__ from the fields above; not an argument
    greedy: bool = field(init=False, repr=False, default=True)

    def __post_init__(self) -> None:
        def bad(name: str, value, rule: str, fix: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={value!r}: {rule}; {fix}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1",
                      "ask for at least one new token (e.g. max_new_tokens=64)")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "must be a finite number >= 0",
                      "use 0 for greedy decoding or a positive value such as 0.7 for sampling")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
                or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must satisfy 0 < top_p <= 1",
                      "use 1.0 to switch nucleus filtering off, or e.g. 0.9")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "must be an integer >= 0",
                      "use 0 to switch top-k filtering off, or e.g. 50")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", self.seed, "must be an int or None", "pass an integer such as 0, or None")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", self.stop, "every stop string must be a non-empty str",
                          "drop empty entries or pass e.g. stop=('\\n\\n',)")
        ids = (self.stop_token_ids,) if isinstance(self.stop_token_ids, int) else tuple(self.stop_token_ids)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise bad("stop_token_ids", self.stop_token_ids, "every stop token id must be an int >= 0",
                          "pass token ids from the tokenizer, e.g. stop_token_ids=(tok.eos_token_ids[0],)")
        # frozen dataclass: normalised values are written through object.__setattr__
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", ids)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "greedy", self.temperature == 0.0)

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator for this request alone (None when unseeded: the global RNG is used)."""
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


def top_k_top_p_keep(logits_RV: torch.Tensor, top_k_R: torch.Tensor, top_p_R: torch.Tensor
                     ) -> torch.Tensor:
    """Boolean mask [R, V] of the tokens that survive top-k then top-p, in vocabulary order.

    top_k 0 keeps every rank; top_p 1 switches nucleus filtering off for that row.
    """
    R, V = logits_RV.shape
    sorted_RV, order_RV = logits_RV.float().sort(dim=-1, descending=True, stable=True)
    rank_V = torch.arange(V, device=logits_RV.device)
    k_R = torch.where(top_k_R > 0, top_k_R.clamp(max=V), torch.full_like(top_k_R, V))
    keep_sorted_RV = rank_V[None, :] < k_R[:, None]
    probs_RV = torch.softmax(sorted_RV.masked_fill(~keep_sorted_RV, float("-inf")), dim=-1)
    # probability mass strictly before each rank; a rank is kept while that mass is below p,
    # so the token that crosses p is kept too. Rows with p == 1 skip this: float rounding of
    # the cumulative sum could otherwise drop tokens of tiny probability.
    before_RV = probs_RV.cumsum(dim=-1) - probs_RV
    nucleus_RV = (before_RV < top_p_R[:, None]) | (top_p_R[:, None] >= 1.0)
    keep_sorted_RV &= nucleus_RV
    keep_RV = torch.zeros_like(keep_sorted_RV)
    keep_RV.scatter_(1, order_RV, keep_sorted_RV)
    return keep_RV


def sample_tokens(logits_RV: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None]) -> list[int]:
    """One next token per row; row r follows params[r] and draws only from generators[r]."""
    R, V = logits_RV.shape
    if len(params) != R or len(generators) != R:
        raise ValueError(f"sample_tokens: {R} logit rows but {len(params)} params and "
                         f"{len(generators)} generators; pass one of each per row")
    logits_RV = logits_RV.float()
    out_R = logits_RV.argmax(dim=-1)  # greedy rows are done; sampled rows are overwritten
    rows = [r for r, p in enumerate(params) if not p.greedy]
    if not rows:
        return out_R.tolist()
    dev = logits_RV.device
    sub_RV = logits_RV if len(rows) == R else logits_RV[rows]
    temp_R = torch.tensor([params[r].temperature for r in rows], device=dev)
    scaled_RV = sub_RV / temp_R[:, None]
    if any(params[r].top_k > 0 or params[r].top_p < 1.0 for r in rows):  # the sort only when a row filters
        top_k_R = torch.tensor([params[r].top_k for r in rows], device=dev, dtype=torch.long)
        top_p_R = torch.tensor([params[r].top_p for r in rows], device=dev)
        scaled_RV = scaled_RV.masked_fill(~top_k_top_p_keep(scaled_RV, top_k_R, top_p_R), float("-inf"))
    probs_RV = torch.softmax(scaled_RV, dim=-1)
    # the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) independent is token i with
    # probability p_i. Each seeded row draws its E from its own generator alone (so a seeded
    # request's tokens do not depend on its batch), the others from the global RNG in one call;
    # every row's choice comes back in one copy (multinomial per row cost a sync per row)
    noise_RV = torch.empty_like(probs_RV)
    if any(generators[r] is None for r in rows):
        noise_RV.exponential_()
    for i, r in enumerate(rows):
        if generators[r] is not None:
            noise_RV[i].exponential_(generator=generators[r])
    # a draw of exactly 0 would make 0 / 0 for a filtered-out token: never below the smallest normal
    choice_R = (probs_RV / noise_RV.clamp_(min=torch.finfo(torch.float32).tiny)).argmax(dim=-1)
    if len(rows) == R:
        return choice_R.tolist()
    out_R[torch.tensor(rows, device=dev)] = choice_R
    return out_R.tolist()


__all__ = ["SamplingParams", "sample_tokens", "top_k_top_p_keep"]
