"""Recording routing traces from any model run, through forward hooks on the routers.

Every ``block.router`` of ``model.moe_blocks()`` returns ``(topk_ids_TK, topk_weights_TK,
router_logits_TE)`` (the model contract); a forward hook copies the ids (and weights) out. A
forward pre-hook on the model itself reads ``input_ids_BT``, ``cache`` and ``valid_BT`` so that
each recorded token is labelled with its request id, position and token id:

- with a KV cache, row ``b`` of the cache is one request; a row whose length is 0 before the
  forward starts a new request (that is how the engine reuses rows), positions continue from
  the row's length;
- without a cache, every row of every forward is a new request, positions are 0..S-1;
- ``TraceRecorder.set_batch(request_ids, positions)`` overrides both for the next forward.

Padding (``valid_BT`` False) is dropped. Tokens are stored in processing order, so within one
request positions increase and "the previous token" is the one decoded just before.

Optionally the hidden state entering chosen MoE layers' routers (the router's input ``x_TD``)
is kept as a predictor feature; it goes to a companion ``.npz`` (``save_features``), never
inside the trace, since it is [T, D] per layer.

Shape legend: B = batch rows, S = new tokens per row, T = tokens, K = top-k, E = experts,
D = hidden size, L = MoE layers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .trace import RoutingTrace, read_npz

_FEATURES_FORMAT = "moeflow.RoutingFeatures"
_FEATURES_VERSION = 1


def _moe_blocks(model) -> list:
    if not hasattr(model, "moe_blocks"):
        raise ValueError(f"{type(model).__name__} has no moe_blocks(); recording needs a model that follows "
                         "the moe.MoEForCausalLM contract (moe_blocks() -> blocks with a .router)")
    blocks = list(model.moe_blocks())
    if not blocks:
        raise ValueError("model.moe_blocks() is empty: the model has no MoE layer to record")
    for i, b in enumerate(blocks):
        if not hasattr(b, "router"):
            raise ValueError(f"MoE block {i} has no .router module to hook")
    return blocks


def _packed_rows(segments, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cache row and the position of every token of a packed step (``MoEForCausalLM.forward(segments=...)``:
    parts of (rows, T) over rows 0, 1, ..., row-major)."""
    row, rows, pos = 0, [], []
    for n, T in segments:
        for b in range(row, row + int(n)):
            rows.append(np.full(int(T), b))
            pos.append(lengths[b] + np.arange(int(T)))
        row += int(n)
    return (np.concatenate(rows), np.concatenate(pos)) if rows else (np.zeros(0, np.int64), np.zeros(0, np.int64))


class TraceRecorder:
    """Context manager: ``with TraceRecorder(model) as rec: model(ids)`` then ``rec.trace()``.

    ``hidden_layers``: MoE layer indices (0..L-1) whose router input is kept as a feature;
    ``"all"`` keeps every layer. ``hidden_dtype``: how the features are stored (float16 halves
    the memory; the predictor only needs their direction).
    """

    def __init__(self, model, hidden_layers: Iterable[int] | str = (), record_weights: bool = True,
                 hidden_dtype=np.float16):
        self.model = model
        self.blocks = _moe_blocks(model)
        L = len(self.blocks)
        if isinstance(hidden_layers, str):
            if hidden_layers != "all":
                raise ValueError(f"hidden_layers must be a list of MoE layer indices or 'all', got {hidden_layers!r}")
            hidden_layers = range(L)
        self.hidden_layers = sorted(set(int(l) for l in hidden_layers))
        bad = [l for l in self.hidden_layers if not 0 <= l < L]
        if bad:
            raise ValueError(f"hidden_layers {bad} out of range: the model has {L} MoE layers (0..{L - 1})")
        self.record_weights = record_weights
        self.hidden_dtype = hidden_dtype
        self._handles: list = []
        self._ids: list[list[np.ndarray]] = [[] for _ in range(L)]  # per layer, per step [T, K]
        self._w: list[list[np.ndarray]] = [[] for _ in range(L)]
        self._hidden: dict[int, list[np.ndarray]] = {l: [] for l in self.hidden_layers}
        self._labels: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per step (req, pos, tok)
        self._step_calls = [0] * L
        self._pending: dict | None = None  # labels of the forward in flight
        self._override: tuple | None = None
        self._row_request: dict[tuple[int, int], int] = {}
        self._next_request = 0
        self._num_experts: int | None = None

    # --- labelling ----------------------------------------------------------------------
    def set_batch(self, request_ids: Sequence[int], positions=None) -> None:
        """Label the rows of the next forward: ``request_ids [B]``, optional ``positions [B, S]``."""
        self._override = (np.asarray(request_ids, dtype=np.int64),
                          None if positions is None else np.asarray(positions, dtype=np.int64))

    def _new_request(self) -> int:
        r = self._next_request
        self._next_request += 1
        return r

    def _pre_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
        valid = kwargs.get("valid_BT", args[2] if len(args) > 2 else None)
        if input_ids is None or not torch.is_tensor(input_ids):
            self._pending = None
            return
        ids_BS = input_ids.detach().cpu().long()
        if ids_BS.ndim == 1:
            ids_BS = ids_BS[None]
        B, S = ids_BS.shape
        valid_BS = (torch.ones(B, S, dtype=torch.bool) if valid is None
                    else valid.detach().cpu().bool().reshape(B, S))
        if self._override is not None:
            req_B, pos_BS = self._override
            self._override = None
            if req_B.shape != (B,):
                raise ValueError(f"set_batch got {req_B.shape[0]} request ids for a batch of {B} rows")
            if pos_BS is None:
                pos_BS = np.broadcast_to(np.arange(S), (B, S))
            req_N, pos_N = np.repeat(req_B, S), np.asarray(pos_BS).reshape(-1)
        elif cache is not None and hasattr(cache, "lengths"):
            lengths = cache.lengths.detach().cpu().long().numpy()
            # each token's cache row and position: a packed step (segments=[(rows, T), ...], input [1, N]) by its
            # parts, a plain one as the one part [(B, S)]
            row_N, pos_N = _packed_rows(kwargs.get("segments") or [(B, S)], lengths)
            req_R = np.empty(int(row_N.max()) + 1 if len(row_N) else 0, dtype=np.int64)
            # a row view (KVCache.rows_range, the engine's eager steps) keys its rows by the cache that owns them
            owner, first = cache.row_origin() if hasattr(cache, "row_origin") else (cache, 0)
            for b in range(len(req_R)):
                key = (id(owner), first + b)
                if lengths[b] == 0 or key not in self._row_request:
                    self._row_request[key] = self._new_request()
                req_R[b] = self._row_request[key]
            req_N = req_R[row_N]
        else:
            req_N = np.repeat(np.array([self._new_request() for _ in range(B)], dtype=np.int64), S)
            pos_N = np.tile(np.arange(S), B)
        self._pending = dict(B=B, S=S, valid=valid_BS.numpy().reshape(-1), req=req_N, pos=pos_N,
                             tok=ids_BS.numpy().reshape(-1))

    def _router_hook(self, layer: int):
        def hook(module, args, output):
            if not (isinstance(output, (tuple, list)) and len(output) >= 2):
                raise ValueError(f"router of MoE layer {layer} returned {type(output).__name__}; the contract is "
                                 "(topk_ids_TK, topk_weights_TK, router_logits_TE)")
            ids = output[0].detach().reshape(-1, output[0].shape[-1]).cpu()
            self._ids[layer].append(ids.to(torch.int16).numpy())
            if self.record_weights:
                self._w[layer].append(output[1].detach().reshape(ids.shape).float().cpu().numpy())
            if len(output) >= 3 and torch.is_tensor(output[2]) and self._num_experts is None:
                self._num_experts = int(output[2].shape[-1])
            if layer in self._hidden:
                x = args[0].detach()
                self._hidden[layer].append(x.reshape(-1, x.shape[-1]).float().cpu().numpy()
                                           .astype(self.hidden_dtype))
            self._step_calls[layer] += 1
        return hook

    def _post_forward(self, module, args, output):
        # Every layer's router ran once for this forward: attach the labels, dropping padding.
        p, self._pending = self._pending, None
        T = self._ids[0][-1].shape[0] if self._ids[0] else 0
        if p is not None and T == p["B"] * p["S"]:
            keep = p["valid"]
        elif p is not None and T == int(p["valid"].sum()):
            keep = None  # the model already dropped the padding
            p = {k: (v[p["valid"]] if k in ("req", "pos", "tok") else v) for k, v in p.items()}
        else:
            # routers saw tokens we cannot match to input rows: label them as one new request
            keep, p = None, dict(req=np.full(T, self._new_request()), pos=np.arange(T), tok=np.full(T, -1))
        if keep is not None:
            self._apply_keep(keep)
            p = {k: p[k][keep] for k in ("req", "pos", "tok")}
        self._labels.append((p["req"], p["pos"], p["tok"]))

    def _apply_keep(self, keep: np.ndarray) -> None:
        for lists in [self._ids, self._w, *([v] for v in self._hidden.values())]:
            for per_layer in lists:
                if per_layer:
                    per_layer[-1] = per_layer[-1][keep]

    # --- context manager ----------------------------------------------------------------------
    def __enter__(self) -> "TraceRecorder":
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        for l, b in enumerate(self.blocks):
            self._handles.append(b.router.register_forward_hook(self._router_hook(l)))
        self._handles.append(self.model.register_forward_hook(self._post_forward))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # --- results -------------------------------------------------------------------------------
    def trace(self, num_experts: int | None = None, meta: dict | None = None) -> RoutingTrace:
        """The recorded trace. ``num_experts`` defaults to the width of the router logits."""
        E = num_experts or self._num_experts
        if E is None:
            raise ValueError("nothing recorded yet (or the routers returned no logits): run the model inside "
                             "the recorder, or pass num_experts=")
        counts = {len(x) for x in self._ids}
        if counts != {len(self._labels)}:
            raise RuntimeError(f"MoE layers were called {sorted(counts)} times but the model ran "
                               f"{len(self._labels)} forwards: were routers called outside model(...)?")
        K = self._ids[0][0].shape[1] if self._ids[0] else 1
        ids = np.stack([np.concatenate(x) if x else np.zeros((0, K), np.int16) for x in self._ids])
        w = (np.stack([np.concatenate(x) for x in self._w]) if self.record_weights and self._w[0] else None)
        req = np.concatenate([l[0] for l in self._labels]) if self._labels else np.zeros(0)
        pos = np.concatenate([l[1] for l in self._labels]) if self._labels else np.zeros(0)
        tok = np.concatenate([l[2] for l in self._labels]) if self._labels else np.zeros(0)
        m = {"source": "recorded"}
        m.update(meta or {})
        return RoutingTrace(ids, int(E), w, req, pos, m, token_ids=tok)

    def features(self) -> dict[str, np.ndarray]:
        """``{"hidden_<l>": [T, D]}`` for each kept layer, plus ``token_ids [T]``."""
        out = {f"hidden_{l}": np.concatenate(v) for l, v in self._hidden.items() if v}
        if self._labels:
            out["token_ids"] = np.concatenate([l[2] for l in self._labels]).astype(np.int32)
        return out


def save_features(path: str | Path, features: dict[str, np.ndarray]) -> Path:
    """Write the per-token predictor features (companion of a trace) as ``.npz``."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    T = {int(v.shape[0]) for v in features.values()}
    if len(T) > 1:
        raise ValueError(f"all features must have one row per token; got row counts {sorted(T)}")
    header = np.frombuffer(json.dumps({"format": _FEATURES_FORMAT, "version": _FEATURES_VERSION,
                                       "names": sorted(features)}).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, header=header, **features)
    return path


def load_features(path: str | Path) -> dict[str, np.ndarray]:
    header, arrays = read_npz(path, "routing features", "write one with routing.save_features")
    if header.get("format") != _FEATURES_FORMAT:
        raise ValueError(f"{path} is not a moeflow features file (format {header.get('format')!r}); "
                         "was it written by routing.save_features?")
    return arrays


def hidden_matrix(features: dict[str, np.ndarray], num_layers: int) -> np.ndarray | None:
    """Stack ``hidden_<l>`` for l = 0..num_layers-1 into [T, L, D], or None if any is missing."""
    keys = [f"hidden_{l}" for l in range(num_layers)]
    if not all(k in features for k in keys):
        return None
    return np.stack([features[k] for k in keys], axis=1)


def pieces(documents: Iterable[Sequence[int]], max_tokens: int, seq_len: int, min_len: int = 16) -> list[list[int]]:
    """Token documents cut into consecutive requests of at most ``seq_len`` tokens (pieces shorter than
    ``min_len`` dropped), until ``max_tokens`` tokens are taken."""
    if max_tokens <= 0 or seq_len <= 0:
        raise ValueError(f"max_tokens ({max_tokens}) and seq_len ({seq_len}) must be positive")
    seqs, total = [], 0
    for ids in documents:
        ids = list(ids)
        for i in range(0, len(ids), seq_len):
            piece = ids[i:i + seq_len][:max_tokens - total]
            if len(piece) >= min_len:
                seqs.append(piece)
                total += len(piece)
            if total >= max_tokens:
                return seqs
    return seqs


def record_trace(model, sequences: Sequence[Sequence[int]], meta: dict | None = None, features: bool = True,
                 batch_size: int = 8, feature_dtype=np.float16) -> tuple[RoutingTrace, dict]:
    """``record_sequences`` with the token ids kept in the trace (a predictor feature), ``meta`` added,
    and (``features``) the hidden state entering every MoE layer stored as ``feature_dtype``."""
    trace, feats = record_sequences(model, sequences, batch_size=batch_size, hidden_layers="all" if features else ())
    token_ids = np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences])
    trace = RoutingTrace(trace.expert_ids, trace.num_experts, None, trace.request_ids, trace.positions,
                         {**trace.meta, **(meta or {})},
                         token_ids=token_ids if len(token_ids) == trace.num_tokens else trace.token_ids)
    feats = {k: v.astype(feature_dtype) if v.dtype == np.float32 else v for k, v in feats.items()}
    return trace, feats


@torch.no_grad()
def record_sequences(model, sequences: Sequence[Sequence[int]], batch_size: int = 8,
                     hidden_layers: Iterable[int] | str = (), device=None) -> tuple[RoutingTrace, dict]:
    """Run token sequences through ``model`` (one full forward per batch, right-padded) and
    return ``(trace, features)``; request ``i`` of the trace is ``sequences[i]``.

    Every token of a sequence is routed with the whole prefix as context, which is what the
    same tokens would see if they were decoded one by one.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    seqs = [list(map(int, s)) for s in sequences]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("record_sequences needs at least one sequence and no empty sequence")
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = "cpu"
    with TraceRecorder(model, hidden_layers=hidden_layers) as rec:
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            S = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), S, dtype=torch.long)
            valid = torch.zeros(len(chunk), S, dtype=torch.bool)
            for b, s in enumerate(chunk):
                ids[b, :len(s)] = torch.tensor(s)
                valid[b, :len(s)] = True
            rec.set_batch(range(start, start + len(chunk)))
            model(ids.to(device), valid_BT=valid.to(device))
    return rec.trace(), rec.features()
