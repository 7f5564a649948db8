"""MoEForCausalLM: one decoder for Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2 and DeepSeek-V3.

Shape legend: B = batch rows, T = new tokens per row, S = key slots, D = hidden size, V = vocabulary.

    input_ids_BT -> embed -> [ layer_i: x += attn(norm(x)); x += mlp(norm(x)) ] * L -> norm -> lm_head -> logits_BTV

``layers[i].mlp`` is a SparseMoEBlock (router, experts, shared experts) or a dense MLP
(DeepSeek's first_k_dense_replace layers, Qwen's mlp_only_layers). Rows of a batch are right
padded (``valid_BT`` False on padding); with a KV cache each row continues at its own length.
Hugging Face parameter names are mapped to these modules in moe/checkpoint.py.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

import kernels

from .attention import Attention, MLAttention
from .config import MoEConfig
from .kv_cache import KVCache, PackedStep
from .layers import MLP, RMSNorm, RotaryEmbedding, SparseMoEBlock


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_idx: int, moe_index: int | None, backend: str, dtype=None, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = cfg.layer_window(layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        attn_cls = MLAttention if cfg.is_mla else Attention
        self.attn = attn_cls(cfg, layer_idx, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        if moe_index is not None:
            self.mlp: nn.Module = SparseMoEBlock(cfg, layer_idx, moe_index, backend, dtype=dtype, device=device)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, device=device)

    def forward(self, x_BTD, cos, sin, mask_B1TS, cache=None, num_slots=0, valid_BT=None):
        x_BTD, h_BTD = self.attention_half(x_BTD, cos, sin, mask_B1TS, cache, num_slots)
        if isinstance(self.mlp, SparseMoEBlock):
            return x_BTD + self.mlp(h_BTD, valid_BT)
        return x_BTD + self.mlp(h_BTD)

    def pick_mask(self, mask_B1TS, windowed: dict):
        """The attention mask this layer reads: its sliding window's, else the full one."""
        return windowed[self.window] if self.window else mask_B1TS

    def attention_half(self, x_BTD, cos, sin, mask_B1TS, cache=None, num_slots=0):
        """(x after the attention residual, its post-attention norm): what the MLP half takes.
        moe.cuda_graph's piecewise decode runs the halves apart around host-deciding experts."""
        x_BTD = x_BTD + self.attn(self.input_layernorm(x_BTD), cos, sin, mask_B1TS, cache, num_slots)
        return x_BTD, self.post_attention_layernorm(x_BTD)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True: attend) as the additive one attention uses: 0 or -inf."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class MoEForCausalLM(nn.Module):
    def __init__(self, config: MoEConfig, backend: str = "torch", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise ValueError(f"config must be a MoEConfig, got {type(config).__name__}; "
                             "use MoEConfig.from_pretrained(dir) or MoEConfig.from_hf_dict(d)")
        kernels.get_backend(backend)
        self.config = cfg = config
        dtype = dtype or cfg.torch_dtype
        kw = dict(dtype=dtype, device=device)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        moe_layers = cfg.moe_layers
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, moe_layers.index(i) if i in moe_layers else None, backend, **kw)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **kw)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        rot_device = None if device is not None and torch.device(device).type == "meta" else device
        self.rotary = RotaryEmbedding(cfg, device=rot_device)
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    # --- set-up -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random init (normal(0, std) for matrices, ones for norms, zero biases and correction bias)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("norm.weight") or "layernorm" in name else 0.0)
            else:
                p.normal_(0.0, std, generator=gen)
        for block in self.moe_blocks():
            if block.router.e_score_correction_bias is not None:
                block.router.e_score_correction_bias.zero_()

    def reset_rotary(self, device=None) -> None:
        """Recompute the rotary frequencies (e.g. after building on the meta device)."""
        self.rotary = RotaryEmbedding(self.config, device=device or self.embed.weight.device)

    def moe_blocks(self) -> list[SparseMoEBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoEBlock)]

    def set_backend(self, name: str) -> None:
        kernels.get_backend(name)
        for block in self.moe_blocks():
            if not hasattr(block.experts, "backend"):
                raise ValueError(f"experts of MoE layer {block.layer_idx} ({type(block.experts).__name__}) "
                                 "have no 'backend' attribute to set")
            block.experts.backend = name

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.embed.weight
        return KVCache(batch_size, max_len, device=w.device, dtype=w.dtype)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # --- forward ----------------------------------------------------------------------------
    def _positions_and_masks(self, B: int, T: int, cache: KVCache | None, valid_BT: torch.Tensor | None,
                             num_slots: int | None = None):
        dev = self.embed.weight.device
        if cache is not None:
            if num_slots is None:  # two host syncs: the room check and the slots attention needs
                cache.check_room(T, valid_BT)
                num_slots = cache.num_slots_for(T)
            pos_BT = cache.positions(T)
            mask_B1TS = cache.attention_mask(T, num_slots)
        else:
            num_slots = T
            pos_BT = torch.arange(T, device=dev).expand(B, T)
            ar = torch.arange(T, device=dev)
            mask_B1TS = (ar[None, :] <= ar[:, None])[None, None].expand(B, 1, T, T)
            if valid_BT is not None:
                # padding keys are hidden; a query always sees itself so an all-padding row has no NaN
                mask_B1TS = (mask_B1TS & valid_BT[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)
        windowed = {}
        for w in {layer.window for layer in self.layers if layer.window}:
            k_pos = torch.arange(num_slots, device=dev)
            windowed[w] = mask_B1TS & (k_pos[None, None, None, :] > pos_BT[:, None, :, None] - w)
        if cache is not None and mask_B1TS.is_cuda:
            # attention on CUDA turns a boolean mask into an additive one in every call (a fill, a
            # negation and a masked fill per layer): made once per forward here instead. Every
            # query sees at least itself, so no row is all -inf. (Without a cache, i.e. training,
            # the causal mask is an expanded view that this would materialise per row: left as is.)
            mask_B1TS = _additive(mask_B1TS, self.dtype)
            windowed = {w: _additive(m, self.dtype) for w, m in windowed.items()}
        return pos_BT, mask_B1TS, windowed, num_slots

    def forward(self, input_ids_BT: torch.Tensor, cache: KVCache | None = None, valid_BT: torch.Tensor | None = None,
                last_only: bool = False, num_slots: int | None = None,
                segments: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] at each row's last valid token with ``last_only``).

        cache: KVCache from new_cache(); rows continue at their own lengths and the cache is
        advanced here. valid_BT: bool [B, T], right padding False (valid tokens are a prefix).
        num_slots: with a cache, the slots attention reads, given by a caller that tracks the rows'
        lengths itself (it must be >= every row's length + T and <= max_len; masked slots change
        nothing). Then the forward reads no device value on the host, so it can be captured in a
        CUDA graph (``moe.cuda_graph``); None: checked and computed here (two host syncs).

        segments: a packed step (``PackedStep``) over cache rows that feed different numbers of tokens:
        ``[(rows, T), ...]`` covering cache rows 0, 1, ... in order, part p's rows feeding T tokens each;
        input_ids (and valid_BT) are then [1, N], the parts' [rows, T] tokens flattened one after another
        (N = sum rows x T). The logits are [1, N, V], or with ``last_only`` [R, 1, V] for the R = sum rows
        rows in order: each row's as if it had run alone. Needs a KVCache.
        """
        if input_ids_BT.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids_BT.shape)}")
        B, T = input_ids_BT.shape
        if valid_BT is not None:
            if valid_BT.shape != input_ids_BT.shape:
                raise ValueError(f"valid mask shape {tuple(valid_BT.shape)} != input_ids shape {(B, T)}")
            valid_BT = valid_BT.to(device=input_ids_BT.device, dtype=torch.bool)
        if segments is not None:
            return self._forward_packed(input_ids_BT, cache, valid_BT, last_only, segments)
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache has {cache.batch_size} rows but the batch has {B}; "
                             "create it with model.new_cache(batch_size, max_len)")
        if num_slots is not None and cache is not None and not T <= num_slots <= cache.max_len:
            raise ValueError(f"num_slots={num_slots} must lie in [T={T}, max_len={cache.max_len}]")
        pos_BT, mask_B1TS, windowed, num_slots = self._positions_and_masks(B, T, cache, valid_BT, num_slots)
        x_BTD = self.embed(input_ids_BT)
        cos, sin = self.rotary(pos_BT, x_BTD.dtype)
        if cache is not None:
            cache.step_slots(pos_BT)
        try:
            for layer in self.layers:
                x_BTD = layer(x_BTD, cos, sin, layer.pick_mask(mask_B1TS, windowed), cache, num_slots, valid_BT)
        finally:
            if cache is not None:
                cache.step_slots(None)
        x_BTD = self.norm(x_BTD)
        if last_only:
            last_B = (valid_BT.sum(1) - 1).clamp(min=0) if valid_BT is not None else torch.full(
                (B,), T - 1, device=x_BTD.device)
            x_BTD = x_BTD[torch.arange(B, device=x_BTD.device), last_B][:, None]
        logits_BTV = self.lm_head(x_BTD)
        if cache is not None:
            cache.advance(valid_BT, T)
        return logits_BTV

    def packs_in_one_pass(self, cache: KVCache) -> bool:
        """Whether a packed step (forward(segments=...)) on this cache attends in one launch over all its tokens
        (every attention module packs: moe.attention.Attention.packs), not part by part."""
        heads = {layer.attn.packed_heads() for layer in self.layers if hasattr(layer.attn, "packed_heads")}
        return len(heads) == 1 and all(hasattr(layer.attn, "packs") and layer.attn.packs(self.dtype, cache, self.device)
                                       for layer in self.layers)

    def _forward_packed(self, ids_1N, cache, valid_1N, last_only, segments) -> torch.Tensor:
        """forward(segments=...): see there."""
        if not isinstance(cache, KVCache):
            raise ValueError("a packed step (segments=) attends through a KVCache's rows; pass cache=model.new_cache(...)")
        parts, start, row = [], 0, 0
        for seg in segments:
            n, T = (int(v) for v in seg)
            if n < 1 or T < 1:
                raise ValueError(f"segments: each part is (rows >= 1, tokens >= 1), got {tuple(seg)}")
            parts.append(dict(row=row, rows=n, tokens=T, start=start, stop=start + n * T))
            row, start = row + n, start + n * T
        if not parts or row > cache.batch_size or ids_1N.shape != (1, start):
            raise ValueError(f"segments {list(segments)} cover {row} rows and {start} tokens: input_ids must be [1, "
                             f"{start}] and the cache hold >= {row} rows (it has {cache.batch_size}); got input_ids of "
                             f"shape {tuple(ids_1N.shape)}")
        if self.packs_in_one_pass(cache):
            return self._forward_packed_fused(ids_1N, cache, valid_1N, last_only, parts)
        windows = {layer.window for layer in self.layers if layer.window}
        pos = []
        try:
            for p in parts:
                n, T = p["rows"], p["tokens"]
                view = cache.rows_range(p["row"], n)
                valid = None if valid_1N is None else valid_1N[0, p["start"]:p["stop"]].view(n, T)
                view.check_room(T, valid)
                pos_BT, mask, windowed, slots = self._positions_and_masks(n, T, view, valid, view.num_slots_for(T))
                view.step_slots(pos_BT)
                p.update(cache=view, valid=valid, mask=mask, windowed=windowed, num_slots=slots)
                pos.append(pos_BT.reshape(-1))
            step = PackedStep(parts)
            masks = {w: step.window(w) for w in windows}
            x_1ND = self.embed(ids_1N)
            cos, sin = self.rotary(torch.cat(pos)[None], x_1ND.dtype)
            for layer in self.layers:
                x_1ND = layer(x_1ND, cos, sin, layer.pick_mask(step, masks), cache, 0, valid_1N)
        finally:
            for p in parts:
                if "cache" in p:
                    p["cache"].step_slots(None)
        x_1ND = self.norm(x_1ND)
        if last_only:
            last = []
            for p in parts:  # each row's last valid token, as an index into N
                n, T = p["rows"], p["tokens"]
                ends = torch.full((n,), T - 1, device=x_1ND.device) if p["valid"] is None else \
                    (p["valid"].sum(1) - 1).clamp(min=0)
                last.append(p["start"] + torch.arange(n, device=x_1ND.device) * T + ends)
            x_1ND = x_1ND[0, torch.cat(last)][:, None]
        logits = self.lm_head(x_1ND)
        for p in parts:
            p["cache"].advance(p["valid"], p["tokens"])
        return logits

    def _forward_packed_fused(self, ids_1N, cache, valid_1N, last_only, parts) -> torch.Tensor:
        """forward(segments=...) with attention over the whole step in one launch (every attention module packs):
        each token's row, position and slot, and the attention's query blocks, worked out once on the host from one
        read of the rows' lengths, then one pass of the layers over the [1, N] tokens (kernels.packed_attention)."""
        from kernels.packed_attention import block_table, group_rows, rows_to_device
        dev = ids_1N.device
        R = parts[-1]["row"] + parts[-1]["rows"]
        T_r = np.concatenate([np.full(p["rows"], p["tokens"], dtype=np.int64) for p in parts])
        start_r = np.concatenate([p["start"] + np.arange(p["rows"], dtype=np.int64) * p["tokens"] for p in parts])
        lengths = cache.lengths[:R]
        if valid_1N is None:
            L = np.asarray(lengths.tolist(), dtype=np.int64)  # the step's one host read
            fed = T_r
        else:
            fed_dev = torch.cat([valid_1N[0, p["start"]:p["stop"]].view(p["rows"], p["tokens"]).sum(1) for p in parts])
            both = np.asarray(torch.cat([lengths, fed_dev.to(lengths.device, torch.long)]).tolist(), dtype=np.int64)
            L, fed = both[:R], both[R:]
        if (L + fed).max() > cache.max_len:
            raise ValueError(f"KV cache full: a row would hold {int((L + fed).max())} tokens but max_len is "
                             f"{cache.max_len}; create the cache with a larger max_len (prompt + max_new_tokens)")
        N = int(T_r.sum())
        within = np.arange(N, dtype=np.int64) - np.repeat(start_r, T_r)
        pos = np.repeat(L, T_r) + within
        host = np.stack([np.repeat(np.arange(R, dtype=np.int64), T_r), np.minimum(pos, cache.max_len), pos])
        row_N, slot_N, pos_N = rows_to_device(host, dev)
        windows = {layer.window for layer in self.layers if layer.window}
        heads = self.layers[0].attn.packed_heads()
        TB = group_rows(*heads)[1]
        tables = {w: block_table(np.arange(R), start_r, T_r, L, TB, dev, cache.max_len, w, kv_heads=heads[1])
                  for w in windows | {0}}
        step = PackedStep([{k: p[k] for k in ("row", "rows", "tokens", "start", "stop")} for p in parts],
                          row_N, slot_N, tables)
        masks = {w: step.window(w) for w in windows}
        x_1ND = self.embed(ids_1N)
        cos, sin = self.rotary(pos_N[None], x_1ND.dtype)
        for layer in self.layers:
            x_1ND = layer(x_1ND, cos, sin, layer.pick_mask(step, masks), cache, 0, valid_1N)
        x_1ND = self.norm(x_1ND)
        if last_only:  # each row's last fed token, as an index into N
            x_1ND = x_1ND[0, torch.from_numpy(start_r + np.maximum(fed - 1, 0)).to(dev)][:, None]
        logits = self.lm_head(x_1ND)
        cache.lengths[:R] += torch.from_numpy(fed).to(cache.lengths.device)
        return logits
