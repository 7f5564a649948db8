"""RoutingTrace: which experts each token took at each MoE layer.

The one record of routing shared by the predictor, the placer, the cache simulator and the
benchmarks (DESIGN.md, "Contracts").

Shape legend: L = MoE layers, T = tokens, K = experts per token (top-k).

    expert_ids   [L, T, K] int16   expert chosen (-1 = no expert, e.g. a dropped token)
    weights      [L, T, K] float32 optional routing weights
    request_ids  [T]       int32   which request (sequence) a token belongs to
    positions    [T]       int32   the token's position inside its request
    token_ids    [T]       int32   optional: the token's vocabulary id (a predictor feature)

Tokens are stored in the order they were processed; within one request, positions increase.
Saved as a compressed ``.npz``; nothing is pickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_FORMAT_VERSION = 1
_PER_TOKEN = ("request_ids", "positions", "token_ids")


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    expert_ids: np.ndarray  # [L, T, K] int16
    num_experts: int
    weights: np.ndarray | None = None  # [L, T, K] float32
    request_ids: np.ndarray | None = None  # [T] int32
    positions: np.ndarray | None = None  # [T] int32
    meta: dict = field(default_factory=dict)
    token_ids: np.ndarray | None = None  # [T] int32 (optional; added after format v1, still v1)

    def __post_init__(self):
        ids = np.asarray(self.expert_ids)
        if ids.ndim != 3:
            raise ValueError(
                f"expert_ids must be [layers, tokens, top_k], got shape {tuple(ids.shape)}; "
                "for a single layer add a leading axis (ids[None])")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"expert_ids must be integers, got dtype {ids.dtype}")
        if self.num_experts <= 0 or self.num_experts > np.iinfo(np.int16).max:
            raise ValueError(f"num_experts must be in 1..32767, got {self.num_experts}")
        if ids.size and (ids.min() < -1 or ids.max() >= self.num_experts):
            raise ValueError(
                f"expert_ids must lie in -1..{self.num_experts - 1} (num_experts={self.num_experts}), "
                f"found values in {int(ids.min())}..{int(ids.max())}: wrong num_experts for this trace?")
        object.__setattr__(self, "expert_ids", ids.astype(np.int16, copy=False))
        L, T, K = ids.shape
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float32)
            if w.shape != ids.shape:
                raise ValueError(f"weights shape {tuple(w.shape)} must equal expert_ids shape {tuple(ids.shape)}")
            object.__setattr__(self, "weights", w)
        for name in _PER_TOKEN:
            v = getattr(self, name)
            if v is None:
                continue
            v = np.asarray(v)
            if v.shape != (T,):
                raise ValueError(f"{name} must have shape [tokens]=({T},), got {tuple(v.shape)}")
            object.__setattr__(self, name, v.astype(np.int32, copy=False))

    # --- shape ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    def request_ids_or_default(self) -> np.ndarray:
        """Request ids, or all zeros (one request) when the trace has none."""
        if self.request_ids is not None:
            return self.request_ids
        return np.zeros(self.num_tokens, dtype=np.int32)

    def paths(self) -> np.ndarray:
        """Each token's routing path through all layers: [T, L, K] int16 (a transposed copy)."""
        return np.ascontiguousarray(self.expert_ids.transpose(1, 0, 2))

    def previous_token_index(self) -> np.ndarray:
        """For each token, the index of the previous token of the same request, or -1: [T] int64.

        "Previous" means the latest earlier-stored token of that request, which is the token
        decoded just before it when the trace was recorded in processing order.
        """
        req = self.request_ids_or_default()
        prev = np.full(self.num_tokens, -1, dtype=np.int64)
        if self.num_tokens == 0:
            return prev
        order = np.argsort(req, kind="stable")  # tokens grouped by request, processing order kept
        same = req[order][1:] == req[order][:-1]
        prev[order[1:][same]] = order[:-1][same]
        return prev

    # --- slicing --------------------------------------------------------------------------
    def select_tokens(self, index) -> "RoutingTrace":
        """A trace of a subset of tokens (a slice, a boolean mask or an index array)."""
        def pick(a):
            return None if a is None else a[..., index] if a.ndim == 1 else a[:, index]
        return RoutingTrace(self.expert_ids[:, index], self.num_experts, pick(self.weights),
                            pick(self.request_ids), pick(self.positions), dict(self.meta),
                            token_ids=pick(self.token_ids))

    def select_layers(self, index) -> "RoutingTrace":
        w = None if self.weights is None else self.weights[index]
        return RoutingTrace(self.expert_ids[index], self.num_experts, w, self.request_ids,
                            self.positions, dict(self.meta), token_ids=self.token_ids)

    def split_requests(self, fraction: float, seed: int = 0) -> tuple["RoutingTrace", "RoutingTrace"]:
        """Split by request (never inside one), e.g. into train / held-out parts."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        req = self.request_ids_or_default()
        uniq = np.unique(req)
        if len(uniq) < 2:
            raise ValueError("the trace holds a single request; record several to split by request")
        rng = np.random.default_rng(seed)
        rng.shuffle(uniq)
        n_first = min(max(1, int(round(len(uniq) * fraction))), len(uniq) - 1)
        first = np.isin(req, uniq[:n_first])
        return self.select_tokens(first), self.select_tokens(~first)

    def interleaved(self, tokens_per_request: int | None = None) -> tuple["RoutingTrace", int]:
        """Decode-step order: step t holds the t-th token of every request, in request order.

        Keeps the requests with at least ``tokens_per_request`` tokens (default: the shortest
        request's count), truncated to that many. Returns ``(trace, requests per step)``, so row
        i of every step is the same request (what a cache simulator's lookahead expects).
        """
        order, requests = self.interleaved_order(tokens_per_request)
        return self.select_tokens(order), requests

    def interleaved_order(self, tokens_per_request: int | None = None) -> tuple[np.ndarray, int]:
        """(token indices of ``interleaved``'s trace, requests per step): to reorder per-token data
        recorded with the trace (hidden states) the same way."""
        req = self.request_ids_or_default()
        uniq, counts = np.unique(req, return_counts=True)
        n = int(counts.min()) if tokens_per_request is None else int(tokens_per_request)
        if n <= 0:
            raise ValueError(f"tokens_per_request must be positive, got {n}")
        keep = uniq[counts >= n]
        if len(keep) == 0:
            raise ValueError(f"no request has {n} tokens (the longest has {int(counts.max())})")
        order = np.concatenate([np.flatnonzero(req == r)[:n] for r in keep])  # [R * n], request-major
        return order.reshape(len(keep), n).T.reshape(-1), len(keep)  # step-major

    @classmethod
    def mix_requests(cls, traces: "list[RoutingTrace]", names: list[str] | None = None) -> "RoutingTrace":
        """The requests of several traces of one model as one trace, interleaved in arrival order: request j of
        trace i gets id j * len(traces) + i (requests numbered by their ids in each trace), so a scheduler that
        takes requests in id order meets the traces' requests in turn (mixed traffic: BENCHMARKS 7o). Tokens keep
        their order; weights are kept only when every trace has them; meta["mixed"] names the sources."""
        if not traces:
            raise ValueError("mix_requests needs at least one trace")
        first = traces[0]
        for i, t in enumerate(traces[1:], 1):
            if (t.num_layers, t.top_k, t.num_experts) != (first.num_layers, first.top_k, first.num_experts):
                raise ValueError(f"trace {i} routes {t.num_layers} layers x top-{t.top_k} of {t.num_experts} experts, "
                                 f"trace 0 {first.num_layers} x top-{first.top_k} of {first.num_experts}: "
                                 "mix traces of one model")
        n = len(traces)
        rid = []
        for i, t in enumerate(traces):
            _, j = np.unique(t.request_ids_or_default(), return_inverse=True)
            rid.append(j.astype(np.int64) * n + i)

        def joined(name):
            parts = [getattr(t, name) for t in traces]
            if any(p is None for p in parts):
                return None
            return np.concatenate(parts, axis=1 if name == "weights" else 0)
        names = names or [str(t.meta.get("text", i)) for i, t in enumerate(traces)]
        return cls(np.concatenate([t.expert_ids for t in traces], axis=1), first.num_experts, joined("weights"),
                   np.concatenate(rid), joined("positions"), {"mixed": list(names)}, token_ids=joined("token_ids"))

    # --- disk -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        arrays = {"expert_ids": self.expert_ids,
                  "header": np.frombuffer(json.dumps({
                      "format": "moeflow.RoutingTrace", "version": _FORMAT_VERSION,
                      "num_experts": int(self.num_experts), "meta": self.meta}).encode(), dtype=np.uint8)}
        for name in ("weights",) + _PER_TOKEN:
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        header, z = read_npz(path, "RoutingTrace", "record one with moeflow's trace recorder or RoutingTrace.save",
                             required=("expert_ids",))
        if header.get("format") != "moeflow.RoutingTrace" or header.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported trace format {header.get('format')} "
                             f"version {header.get('version')} (this moeflow reads version {_FORMAT_VERSION})")
        opt = {n: z.get(n) for n in ("weights",) + _PER_TOKEN}
        return cls(z["expert_ids"], int(header["num_experts"]), meta=header.get("meta", {}), **opt)

    def __repr__(self) -> str:
        return (f"RoutingTrace(layers={self.num_layers}, tokens={self.num_tokens}, top_k={self.top_k}, "
                f"num_experts={self.num_experts})")


def read_npz(path: str | Path, what: str, hint: str, required: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """``(header, arrays)`` of a moeflow ``.npz`` (a JSON ``header`` array plus named arrays).

    Shared by every moeflow file of this kind; errors name the file, what it should have been
    (``what``) and how to make one (``hint``). Nothing is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist; {hint}")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a {what} .npz file ({e}); {hint}") from e
    with z:
        missing = [n for n in ("header",) + tuple(required) if n not in z]
        if missing:
            raise ValueError(f"{path} lacks the {missing} arrays of a {what} file; {hint}")
        try:
            header = json.loads(bytes(z["header"]).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt {what} header ({e})") from e
        arrays = {k: z[k] for k in z.files if k != "header"}
    return header, arrays
