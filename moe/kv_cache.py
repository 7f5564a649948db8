"""Per-row KV cache: each batch row has its own length, so rows of different lengths share
one batch with no left padding, and a row can be reset and reused (continuous batching).

Shape legend: B = batch rows, H = KV heads, S = cache slots (max_len), T = new tokens,
Dk / Dv = key / value head size (they differ under MLA).

A forward over new tokens ``input_ids [B, T]`` with ``valid [B, T]`` (right padding: the valid
tokens of a row are a prefix) writes each row's tokens at slots ``lengths[b] + i`` and lets
query ``(b, i)`` see slots ``0 .. lengths[b] + i``. ``advance(valid)`` then adds the number of
valid tokens to each row's length; invalid tokens were written past the row's length and are
overwritten later.

Only a row's valid tokens need room: a decoding row near ``max_len`` and a long prompt joining
in a free row share one forward (continuous batching). Padding that would land past the end is
written to one spare slot (index ``max_len``) that attention never reads, so it can never
overwrite a valid token.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, batch_size: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"batch_size ({batch_size}) and max_len ({max_len}) must be positive")
        self.batch_size = batch_size
        self.max_len = max_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # [B]
        self._k: dict[int, torch.Tensor] = {}  # layer -> [B, H, S, Dk]
        self._v: dict[int, torch.Tensor] = {}  # layer -> [B, H, S, Dv]
        # slots of the new tokens of the forward in progress (set by step_slots(), shared by every
        # layer's update); None outside a model forward
        self._step_slots_BT: torch.Tensor | None = None

    @staticmethod
    def storage_slots(max_len: int) -> int:
        """Slots each row's keys/values take: max_len and the spare slot for padding past the end."""
        return max_len + 1

    # --- positions and masks (computed once per forward, shared by all layers) -------------
    def positions(self, T: int) -> torch.Tensor:
        """Absolute positions of T new tokens: [B, T]."""
        return self.lengths[:, None] + torch.arange(T, device=self.device)[None, :]

    def check_room(self, T: int, valid_BT: torch.Tensor | None = None) -> None:
        # one host sync per forward; the generation engine checks lengths itself before a step
        added = T if valid_BT is None else valid_BT.sum(dim=1).to(self.lengths.device)
        need = int((self.lengths + added).max())
        if need > self.max_len:
            raise ValueError(f"KV cache full: a row would hold {need} tokens but max_len is {self.max_len}; "
                             "create the cache with a larger max_len (prompt + max_new_tokens)")

    def attention_mask(self, T: int, num_slots: int) -> torch.Tensor:
        """Boolean mask [B, 1, T, num_slots]: query i of row b sees slots <= lengths[b] + i."""
        q_pos = self.positions(T)  # [B, T]
        slots = torch.arange(num_slots, device=self.device)
        return (slots[None, None, :] <= q_pos[:, :, None])[:, None]

    # --- storage ---------------------------------------------------------------------------
    def update(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor, num_slots: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values of ``layer``; return the first ``num_slots`` slots [B, H, num_slots, D]."""
        B, H, T, Dk = k_BHTD.shape
        k_all, v_all = self.buffers(layer, H, Dk, v_BHTD.shape[-1])
        slot_BT = self.new_slots(T)
        idx_k = slot_BT[:, None, :, None].expand(B, H, T, Dk)
        idx_v = slot_BT[:, None, :, None].expand(B, H, T, v_BHTD.shape[-1])
        k_all.scatter_(2, idx_k, k_BHTD.to(self.dtype))
        v_all.scatter_(2, idx_v, v_BHTD.to(self.dtype))
        return k_all[:, :, :num_slots], v_all[:, :, :num_slots]

    def buffers(self, layer: int, H: int, Dk: int, Dv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value storage [B, H, S + 1, Dk / Dv] (allocated on first use), for
        code that writes the new tokens itself (kernels.attn_prep) instead of calling update."""
        if layer not in self._k:
            S = self.storage_slots(self.max_len)
            self._k[layer] = torch.zeros(self.batch_size, H, S, Dk, device=self.device, dtype=self.dtype)
            self._v[layer] = torch.zeros(self.batch_size, H, S, Dv, device=self.device, dtype=self.dtype)
        return self._k[layer], self._v[layer]

    def new_slots(self, T: int) -> torch.Tensor:
        """[B, T] slot of each new token of the forward in progress; padding past the end goes to the
        spare slot (check_room has made sure every valid token fits below max_len)."""
        slot_BT = self._step_slots_BT
        if slot_BT is None or slot_BT.shape[1] != T:
            slot_BT = self.slots_of(self.positions(T))
        return slot_BT

    def slots_of(self, pos_BT: torch.Tensor) -> torch.Tensor:
        """Cache slot of each new token at positions pos_BT: the position, or the spare slot past the end."""
        return pos_BT.clamp(max=self.max_len)

    def step_slots(self, pos_BT: torch.Tensor | None) -> None:
        """The forward in progress writes its tokens at slots_of(pos_BT) in every layer: computed here
        once instead of in each layer's update (three kernels per layer of a decode step). The model
        sets it before its layers and clears it (None) after; an update outside that computes its own."""
        self._step_slots_BT = None if pos_BT is None else self.slots_of(pos_BT)

    def advance(self, valid_BT: torch.Tensor | None, T: int) -> None:
        if valid_BT is None:
            self.lengths += T
        else:
            self.lengths += valid_BT.sum(dim=1).to(torch.long)

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Empty some rows (all by default) so new sequences can use them."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, device=self.device, dtype=torch.long)] = 0

    def rows_prefix(self, n: int) -> "KVCache":
        """Rows 0 .. n-1 as a cache of their own, sharing this one's storage and lengths (no copy: slices of the
        first dimension stay contiguous): a forward over only those rows writes, reads and advances them here.
        The generation engine runs its eager steps on the rows up to the last running one, not all B."""
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"rows_prefix({n}): a cache of {self.batch_size} rows has prefixes of 1..{self.batch_size}")
        return self.rows_range(0, n)

    def row_origin(self) -> tuple["KVCache", int]:
        """(the cache that owns these rows, the index there of this one's row 0): a row view's rows are the
        owner's, so a caller that follows rows across steps (routing.TraceRecorder) keys them by the owner."""
        return self, 0

    def rows_range(self, start: int, n: int) -> "KVCache":
        """Rows start .. start+n-1 as a cache of their own (a view, as rows_prefix): one part of a packed step
        (PackedStep) attends through it."""
        if not (0 <= start and 1 <= n and start + n <= self.batch_size):
            raise ValueError(f"rows_range({start}, {n}): a cache of {self.batch_size} rows has rows 0..{self.batch_size - 1}")
        if (start, n) == (0, self.batch_size):
            return self
        owner, first = self.row_origin()  # (a view's rows are its owner's: no view of a view)
        return _RowRange(owner, first + start, n)

    # On CUDA, attention reads the slots rounded up to this many (the rest are masked). With the
    # exact width, new at every decode step, eager Qwen3-shaped decode on the H200 took 76.6 ms
    # per 16-layer step at batch 1 against 14.2 rounded up (BENCHMARKS 9): the cost of a new key
    # length each step (cuDNN attention plans per shape). DecodeGraphs buckets the same way.
    SLOT_BUCKET = 256

    def num_slots_for(self, T: int) -> int:
        """Slots attention must look at this forward: max(lengths) + T (one host sync), rounded up
        to SLOT_BUCKET on CUDA."""
        need = int(self.lengths.max()) + T
        if self.device.type == "cuda":
            need = -(-need // self.SLOT_BUCKET) * self.SLOT_BUCKET
        return min(need, self.max_len)


class _RowRange(KVCache):
    """Rows start .. start+n-1 of a KVCache (``KVCache.rows_range``, ``rows_prefix``): its lengths a view of the
    base's, its buffers the base's (allocated there on first use) sliced to those rows, so every write and advance
    lands in the base."""

    def __init__(self, base: KVCache, start: int, n: int):
        self._base, self._start = base, start
        self.batch_size, self.max_len, self.device, self.dtype = n, base.max_len, base.device, base.dtype
        self.lengths = base.lengths[start:start + n]
        self._step_slots_BT = None

    def buffers(self, layer: int, H: int, Dk: int, Dv: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._base.buffers(layer, H, Dk, Dv)
        return k[self._start:self._start + self.batch_size], v[self._start:self._start + self.batch_size]

    def row_origin(self) -> tuple[KVCache, int]:
        return self._base, self._start


class PackedStep:
    """One forward over cache rows that feed different numbers of new tokens, packed with no padding between them.

    The step's tokens are [1, N]: its parts one after another, part p covering ``rows`` consecutive cache rows that
    each feed ``tokens`` (T) tokens, row-major (N = sum rows x T). Everything but attention works token by token, so
    it runs on the packed tokens as they are; attention runs part by part, each on its rows of the cache
    (``rows_range``: a view, no copy) as [rows, T], with its own mask and slots. The generation engine makes a
    part of every run of rows that feed the same count: a long prompt's chunk beside decoding rows is then
    chunk + rows tokens of projections, norms and attention, not rows x chunk of them mostly padding.

    The model passes it in place of the attention mask (``MoEForCausalLM.forward(segments=...)``), so attention
    modules and their hooks see one call a layer; ``window(w)`` is the same step with each part's sliding-window
    mask. ``run(fn, x, cos, sin)`` calls ``fn(x_part [rows, T, D], cos_part, sin_part, mask, cache, num_slots)``
    per part and packs the outputs back to [1, N, *].

    In one pass instead (``fused``, where every attention module of the model can: ``Attention.packs``), the step
    carries no masks and no row views: each token's cache row and slot (``row_N``, ``slot_N``) and, per sliding
    window in use (0: none), the attention's query blocks (``tables``: kernels.packed_attention.block_table; ``table``
    is this step's window's), and attention runs over all the step's tokens in one launch.

    ``parts`` then holds each part's rows, tokens, start and stop alone."""

    def __init__(self, parts: list[dict], row_N: torch.Tensor | None = None, slot_N: torch.Tensor | None = None,
                 tables: dict | None = None, window_size: int = 0):
        self.parts = parts  # each: cache (a view), rows, tokens, start, stop (in N), mask, windowed, num_slots
        self.row_N, self.slot_N, self.tables, self.window_size = row_N, slot_N, tables, window_size

    @property
    def fused(self) -> bool:
        return self.tables is not None

    @property
    def table(self):
        return self.tables[self.window_size]

    def window(self, w: int) -> "PackedStep":
        if self.fused:
            return PackedStep(self.parts, self.row_N, self.slot_N, self.tables, w)
        return PackedStep([dict(p, mask=p["windowed"][w]) for p in self.parts])

    def attend(self, module, x_1ND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """An attention module's output for the step: in one pass (``fused``: ``module._forward_packed``) or part by
        part (``run`` of ``module.forward``)."""
        if self.fused:
            return module._forward_packed(x_1ND, cos, sin, self, cache)
        return self.run(module.forward, x_1ND, cos, sin)

    def run(self, fn, x_1ND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        outs = []
        for p in self.parts:
            n, T, a, b = p["rows"], p["tokens"], p["start"], p["stop"]
            y = fn(x_1ND[:, a:b].reshape(n, T, -1), cos[:, a:b].reshape(n, T, -1), sin[:, a:b].reshape(n, T, -1),
                   p["mask"], p["cache"], p["num_slots"])
            outs.append(y.reshape(1, n * T, -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
