"""The routing-path predictor (ExpertFlow's idea, our own model) and its evaluation.

``PathPredictor`` forecasts, for each token, the experts of every later MoE layer from what is
known when its forward starts (the previous token's path, its token id) and sharpens the
forecast as real routing arrives layer by layer (``predict_batch`` conditions on the known
prefix), optionally with the next layers' gates applied to the current hidden state.

Model: a log-linear product of evidence sources. For a target layer m and expert e,

    score[m, e] = w[g, pop] * log pop[m, e] + sum_s w[g, s] * (log P_s(e at m) - log pop[m, e])
    probs[m, :] = min(1, k * softmax_e(score[m, :]))      (the expected use of each expert)

with sources s:
  - ``trans-c`` (c = 0..C-1): the known experts of layer j = layer - c, through the counted
    table P(e at m | e' at j), averaged in log space over the token's k experts at j (a
    product of the k conditionals, which singles out the path they share);
  - ``repeat``: 1 if the previous token used e at layer m (an either/or that log-probabilities
    cannot express: "repeat the previous token, or follow the other evidence");
  - ``token``: the token id (hashed into buckets) through P(e at m | token id);
  - ``gate``: softmax of layer m's router applied to the hidden state entering the last known
    layer (only when a ``GateLookahead`` and hidden states are given);
  - ``anchor``: layer 0's experts through the same tables, once layer 0 has left the recent
    window (the first layer's routing is the most token-specific; it separates paths that
    share experts later on);
  - ``match-c`` (c = 0..M-1) and ``match-anchor``: the exact expert set of layer layer - c
    (and of layer 0) through a ``SetMatchTable`` -- what stored tokens that took that very set
    used later (the nearest-stored-trace idea as a hash lookup; an unseen set is replaced by
    the seen one sharing the most experts);
  - ``neighbours``: the later experts of the 8 stored tokens nearest to this one's known path,
    searched among those sharing its latest set or the one before (``neighbour_counts``);
  - ``successor``: the previous token's layer-0 set (nearly its identity) through the table of
    what the tokens that followed it used: known before the forward starts (a bigram of paths).
Where the gate source is given, its lookahead can also answer alone: for each known layer and distance
the fit compares, on the requests held out from the counting, the top-k recall of the predictor with that
of the lookahead's own softmax, and keeps the lookahead's answer where it reads better (``direct_LD``). The
weights are shared across known layers, so a source that reads far better at some layers than at others
(a deep model's routers, BENCHMARKS 7h/7i) is under-used there by the product alone.
Every table is counted from a trace and smoothed toward popularity; an absent source
contributes 0 (no evidence). The weights w[g, s] depend on the group g: the distance
m - layer when layers are known, or the target layer m when nothing is known yet; they are
fitted by Newton steps on a listwise loss (softmax over the layer's experts against the real
set), on requests held out from the counting (so the weights learn how far each table can be
trusted on new text); the set sources start at weight 0 with a stronger ridge. Training takes
seconds on a CPU; a prediction is a few table gathers and one small neighbour search (at
Qwen3-30B-A3B's shape on one core: 20-50 us per token at 64 tokens; one token alone ~0.2 ms, set
by the ~100 array operations of a call rather than by its size; BENCHMARKS.md section 7).

Shape legend: N = tokens, L = MoE layers, l = known layers, K = top-k, E = experts,
S = evidence sources, G = weight groups, B = token-id buckets, D = hidden size.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .baselines import GateLookahead, PathModel, check_inputs, finish, multi_hot
from .listwise import newton_softmax
from .setmatch import SetMatchTable, _masks
from .stats import cost_per_token_us, evaluate, token_inputs  # noqa: F401  (re-exported)
from .trace import RoutingTrace, read_npz

_FORMAT = "moeflow.PathPredictor"
_VERSION = 3  # v2 added the exact-set match sources (v1 files load with those sources off), v3 direct_LD
_LOG_FLOOR = -12.0
_GATHER_ROWS = 512  # table rows the fast path gathers with numpy (more: embedding_bag; measured crossing ~1000)
_DIRECT_TOKENS = 1024  # held-out tokens per known layer that choose between the predictor and its lookahead


def _topk_recall(probs_NME: np.ndarray, true_NMK: np.ndarray, k: int) -> np.ndarray:
    """[M] recall of each target row's top-k against the real ids (-1: none). Ties (probabilities clipped at 1)
    may fall either way, where ``evaluate`` keeps the lower id: a full stable sort cost a deep model's fit
    half a minute."""
    top = torch.topk(torch.from_numpy(np.ascontiguousarray(probs_NME)), k, dim=-1).indices.numpy()  # [N, M, k]
    hit = (top[..., :, None] == true_NMK[..., None, :]).any(-2) & (true_NMK >= 0)  # [N, M, K]
    return hit.sum((0, 2)) / np.maximum((true_NMK >= 0).sum((0, 2)), 1)


@dataclass
class PredictorConfig:
    context_layers: int = 3  # known layers used as evidence, the most recent ones
    smoothing: float = 2.0  # pseudo-tokens pulling every counted conditional toward popularity
    token_buckets: int = 4096  # rows of the hashed token-id table (0: no token-id source)
    max_span: int = 16  # longest layer distance with a transition table (bounds memory: L*span*E*E)
    fit_elements: int = 1 << 23  # size budget of the tensor the weights are fitted on
    fit_iters: int = 20  # Newton steps
    holdout: float = 0.3  # share of requests that fit the weights (the tables count the rest)
    seed: int = 0
    # latest known layers whose exact expert set is looked up (0: none). Off by default since session 14: on
    # trained models they add <= 0.004 next-layer recall and no hit ratio, and cost two thirds of a batch-1
    # call (BENCHMARKS 7e); they pay on collapsed or memorised routing, where a set fingerprints the token
    match_layers: int = 0
    # stored tokens sharing the latest set that the neighbours are chosen from (256 was no better on a
    # split of train, at twice the cost)
    match_pool: int = 128
    match_second_pool: int = 64  # and of those sharing the set before it (for a token whose latest set is noisy)
    match_neighbours: int = 8  # nearest of them whose later experts are counted
    match_depth: int = 6  # known layers before the latest compared (weights decay 0.7 per layer back)
    match_ridge: float = 20.0  # ridge of the set-match sources' weights (the pairwise ones: 1)
    match_smoothing: float = 0.5  # pseudo-tokens of the set tables and the neighbours (chosen on a split of train)

    def __post_init__(self):
        if self.match_layers < 0:
            raise ValueError(f"match_layers must be >= 0, got {self.match_layers}")
        if (min(self.match_pool, self.match_neighbours) < 1 or self.match_depth < 0 or self.match_smoothing <= 0
                or self.match_second_pool < 0):
            raise ValueError(f"match_pool ({self.match_pool}) and match_neighbours ({self.match_neighbours}) "
                             f"must be >= 1, match_depth ({self.match_depth}) >= 0 and match_smoothing "
                             f"({self.match_smoothing}) > 0")
        if self.context_layers < 1:
            raise ValueError(f"context_layers must be >= 1, got {self.context_layers}")
        if self.smoothing <= 0:
            raise ValueError(f"smoothing must be > 0, got {self.smoothing}")
        if self.token_buckets < 0 or self.max_span < 1:
            raise ValueError(f"token_buckets ({self.token_buckets}) must be >= 0 and max_span ({self.max_span}) >= 1")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.fit_elements < 1 << 16 or self.fit_iters < 1:
            raise ValueError(f"fit_elements ({self.fit_elements}) must be >= 65536 and fit_iters ({self.fit_iters}) >= 1")


def _masked_mean(rows_XKE: np.ndarray, valid_XK: np.ndarray) -> np.ndarray:
    """Mean over the K axis of the rows gathered for valid ids (ignoring -1) -> [..., E]; 0 if none."""
    n = valid_XK.sum(-1, keepdims=True)
    return (rows_XKE * valid_XK[..., None]).sum(-2) / np.maximum(n, 1)


class _Tables:
    """Counted conditionals of one trace, as log-ratios against popularity.

    ``trans[j, e', d - 1, e]`` = log P(e at layer j + d | e' at layer j) - log pop[j + d, e]; row
    e' = E is all zeros, the padding row that id -1 maps to (so a gather needs no mask).
    """

    def __init__(self, trace: RoutingTrace, cfg: PredictorConfig):
        L, T, K = trace.expert_ids.shape
        E, a = trace.num_experts, cfg.smoothing
        self.span = min(cfg.max_span, max(L - 1, 1))
        ids = trace.expert_ids.astype(np.int64)  # [L, T, K]
        count_LE = np.stack([np.bincount(ids[l][ids[l] >= 0], minlength=E) for l in range(L)]).astype(np.float64)
        pop = (count_LE + a * K / E) / (T + a)  # [L, E], rows sum to K
        self.log_pop = np.log(pop).astype(np.float32)

        def log_ratio(joint_XE, count_X, m):  # smoothed log P(e at m | x) - log pop[m, e]
            p = (joint_XE + a * pop[m]) / (count_X[:, None] + a)
            return (np.log(np.maximum(p, 1e-30)) - self.log_pop[m]).astype(np.float32)

        self.trans = np.zeros((L, E + 1, self.span, E), dtype=np.float32)
        for j in range(L):
            for d in range(1, min(self.span, L - 1 - j) + 1):
                # co-occurrence counts of (e' at j, e at j + d) over tokens, by bincount of pair codes
                pj, pm = ids[j][:, :, None], ids[j + d][:, None, :]
                ok = (pj >= 0) & (pm >= 0)
                code = (pj * E + pm)[ok]
                joint = np.bincount(code, minlength=E * E).reshape(E, E)
                self.trans[j, :E, d - 1] = log_ratio(joint, count_LE[j], j + d)
        self.buckets = cfg.token_buckets if trace.token_ids is not None else 0
        # the successor table: the previous token's set at layer 0 (nearly its identity) as the key,
        # the token's own experts at every layer as the targets -- a bigram over paths, known before
        # the token's forward starts (pseudo-trace: layer 0 = the previous token's, 1..L = the token's)
        has_prev = trace.previous_token_index() >= 0
        prev_ids = ids[0][np.maximum(trace.previous_token_index(), 0)][has_prev]
        pseudo = np.concatenate([prev_ids[None], ids[:, has_prev]], axis=0)  # [L + 1, T', K]
        self.successor = SetMatchTable.count(pseudo, E, np.concatenate([self.log_pop[:1], self.log_pop]), L,
                                             cfg.match_smoothing, keep_paths=False,
                                             key_layers=1 if cfg.match_layers else 0)
        # with match_layers = 0 the table is counted over no layer pair: empty, every lookup misses
        self.match = SetMatchTable.count(ids if cfg.match_layers else ids[:1], E, self.log_pop, self.span,
                                         cfg.match_smoothing,
                                         keep_paths=cfg.match_layers > 0)
        self.token = np.zeros((self.buckets, L, E), dtype=np.float32)
        if self.buckets:
            bucket = np.mod(trace.token_ids.astype(np.int64), self.buckets)
            cnt = np.bincount(bucket, minlength=self.buckets).astype(np.float64)
            for m in range(L):
                b_TK = np.broadcast_to(bucket[:, None], ids[m].shape)
                ok = ids[m] >= 0
                joint = np.bincount(b_TK[ok] * E + ids[m][ok], minlength=self.buckets * E).reshape(self.buckets, E)
                self.token[:, m] = log_ratio(joint, cnt, m)

    def arrays(self) -> dict[str, np.ndarray]:
        succ = {f"succ_{k}": v for k, v in self.successor.arrays().items()}
        return {"log_pop": self.log_pop, "trans": self.trans, "token": self.token, **self.match.arrays(), **succ}

    @classmethod
    def from_arrays(cls, arrays: dict) -> "_Tables":
        t = cls.__new__(cls)
        t.log_pop, t.trans, t.token = (arrays[k] for k in ("log_pop", "trans", "token"))
        t.span, t.buckets = t.trans.shape[2], t.token.shape[0]
        if "match_keys" in arrays:
            t.match = SetMatchTable.from_arrays(arrays)
            t.successor = SetMatchTable.from_arrays({k[5:]: v for k, v in arrays.items() if k.startswith("succ_")})
        else:  # a v1 file: an empty table (every lookup misses)
            E = t.log_pop.shape[1]
            t.match = SetMatchTable(np.zeros((0, 1), np.int16), np.zeros(0, np.int16),
                                    np.zeros((1, t.span, E), np.float32))
            t.successor = t.match
        return t


class _Plan:
    """What the fast path needs for one last known layer and weight set, computed on first use from
    the tables and weights (which do not change between calls): at batch 1 a prediction costs its
    number of array operations, so none is spent on what would come out the same every time.

    Target row r is layer ``layer + 1 + r`` (M rows); the pairwise, set, neighbour and successor
    sources reach the first R <= max_span rows only ("near" rows).
    """

    def __init__(self, model: "PathPredictor", W_MS: np.ndarray, layer: int, use_tok: bool, use_gate: bool):
        t, cfg = model.tables, model.config
        self.use_tok, self.use_gate = use_tok, use_gate
        C, Mt, L, E, span = cfg.context_layers, cfg.match_layers, model.num_layers, model.num_experts, t.span
        first = layer + 1
        self.M = M = L - first
        self.R = R = min(M, max(span, cfg.max_span))  # (the successor's reach from layer -1 exceeds span)
        r = np.arange(R)
        self.z0 = (W_MS[:, 0, None] * t.log_pop[first:]).astype(np.float32)  # [M, E]: the popularity source
        self.rep_off = (np.arange(M) * E)[:, None]  # [M, 1]: row r's start in a token's flat scores
        self.known_off = (np.arange(first) * E)[:, None]  # [l, 1]: known layer j's start in a flat probs row
        self.w_rep, self.w_tok, self.w_gate = W_MS[:, C + 1, None], W_MS[:, C + 2, None], W_MS[:, C + 3, None]

        def near(col: int, nd: int) -> np.ndarray:  # [R] weight of a source on the near rows it reaches
            assert nd <= R, (nd, R)
            return np.where(r < nd, W_MS[:R, col], 0.0).astype(np.float32)

        # pairwise sources: (layer j, first table row d0, rows reached, weight column); row r of the
        # source is t.trans[j, e, d0 + r] (rows past the reach read a clipped row at weight 0)
        pair = []
        for c in range(C):
            j = layer - c
            if j < 0:
                break
            d_hi = min(span, L - 1 - j)
            if d_hi >= c + 1:
                pair.append((j, c, d_hi - c, 1 + c))
        if layer >= C and min(span, L - 1) >= first:  # the anchor: layer 0 through the same tables
            pair.append((0, layer, min(span, L - 1) - first + 1, C + 4))
        self.t_js = np.array([j for j, *_ in pair], dtype=np.int64)
        # flat row of t.trans viewed [L * (E + 1) * span, E]: ((j * (E + 1) + e) * span + d); + e * span per call
        self.t_base = np.stack([j * (E + 1) * span + np.minimum(d0 + r, span - 1) for j, d0, _, _ in pair], 1
                               )[:, :, None] if pair else np.zeros((R, 0, 1), np.int64)  # [R, Jt, 1]
        self.t_coef = (np.stack([near(col, nd) for _, _, nd, col in pair], 1)[:, :, None] if pair
                       else np.zeros((R, 0, 1), np.float32))  # [R, Jt, 1]
        K = model.top_k  # every slot routed: each of the k rows weighs coef / k
        self.t_w = np.repeat(self.t_coef / np.float32(K), K, -1).reshape(R, 1, -1)  # [R, 1, Jt * K]
        self.trans_np = t.trans.reshape(-1, E)
        self.trans_rows = torch.from_numpy(self.trans_np)
        # set sources: the exact sets of layers layer - c and 0 (row r of layer j's rows: d - 1 = layer - j + r)
        self.nb = bool(Mt and t.match.has_paths and 0 <= layer < L - 1)
        self.succ = bool(Mt and first < L and t.successor.num_keys)
        match = []
        if Mt:
            js = [(C + 5 + c, layer - c) for c in range(Mt) if layer - c >= 0]
            if layer >= Mt:
                js.append((C + 5 + Mt, 0))
            match = [(col, j, min(span, L - 1 - j) - (layer - j)) for col, j in js]
            match = [m for m in match if m[2] >= 1]
        # looked-up layers: the match sources', then the sets the neighbours' pools are keyed by
        look = [j for _, j, _ in match]
        if self.nb:
            look += [j for j in range(layer, layer - 4, -1) if j >= 0 and j not in look]
        self.look_layers = tuple(look)
        # masks of the known sets: the looked-up layers', then those the neighbours compare (j0..layer)
        j0 = max(0, layer - cfg.match_depth)
        self.mask_layers = np.array(look + (list(range(j0, layer + 1)) if self.nb else []), dtype=np.int64)
        self.m_pos = np.arange(len(match))  # the match sources come first in look_layers
        self.m_d = (np.stack([np.minimum(layer - j + r, span - 1) for _, j, _ in match], 1) if match
                    else np.zeros((R, 0), np.int64))  # [R, Jm]
        self.m_coef = (np.stack([near(col, nd) for col, _, nd in match], 1) if match
                       else np.zeros((R, 0), np.float32))  # [R, Jm]
        nb_col, succ_col = C + 6 + Mt, C + 7 + Mt
        if self.nb:
            a = np.float32(cfg.match_smoothing)
            self.nb_log_pop = t.log_pop[first:first + R]
            self.nb_apop = a * np.exp(self.nb_log_pop)
            self.nb_coef = near(nb_col, R)[:, None]
        if self.succ:  # row m of the successor table targets layer m, no further than max_span ahead
            self.s_rows = np.minimum(first + r, t.successor.span - 1)[None]  # [1, R]
            self.s_coef = near(succ_col, min(L, first + cfg.max_span) - first)[:, None]


class PathPredictor(PathModel):
    name = "predictor"

    def __init__(self, tables: _Tables, weight_sets: dict[str, np.ndarray], top_k: int,
                 config: PredictorConfig | None = None, lookahead: GateLookahead | None = None,
                 direct_LD: np.ndarray | None = None):
        self.tables = tables
        self.num_layers, self.num_experts = tables.log_pop.shape
        self.top_k = top_k
        self.config = config or PredictorConfig()
        # one weight set per combination of optional inputs the predictor was fitted with
        # ("base", "token", "gate", "token+gate"): a source missing at prediction time must not
        # leave the others weighted as if it were there
        self.weight_sets = {k: np.asarray(v, dtype=np.float32) for k, v in weight_sets.items()}
        self.lookahead = lookahead
        # [L - 1, L - 1] bool: known layer l, distance d + 1 -> the lookahead's own answer (with the gate source)
        L = self.num_layers
        self.direct_LD = np.zeros((L - 1, L - 1), bool) if direct_LD is None else np.asarray(direct_LD, bool)
        if self.direct_LD.shape != (L - 1, L - 1):
            raise ValueError(f"direct_LD must be [{L - 1}, {L - 1}], got {self.direct_LD.shape}")
        C = self.config.context_layers
        Mt = self.config.match_layers
        self.source_names = (["pop"] + [f"trans-{c}" for c in range(C)] + ["repeat", "token", "gate", "anchor"]
                             + ([f"match-{c}" for c in range(Mt)] + ["match-anchor", "neighbours", "successor"] if Mt else []))
        self.reference = False  # True: score with the plain reference path (tests compare the two)
        if "base" not in self.weight_sets:
            raise ValueError("a PathPredictor needs the 'base' weight set (no optional inputs)")
        for k, w in self.weight_sets.items():
            assert w.shape == (2 * self.num_layers - 1, len(self.source_names)), (k, w.shape)

    def _weights(self, has_token: bool, has_gate: bool) -> tuple[np.ndarray, bool, bool]:
        """The weight set for the inputs at hand, and which optional sources it uses."""
        for tok, gate in ((has_token, has_gate), (has_token, False), (False, has_gate), (False, False)):
            key = "+".join(n for n, on in (("token", tok), ("gate", gate)) if on) or "base"
            if key in self.weight_sets:
                return self.weight_sets[key], tok, gate
        raise AssertionError("unreachable: 'base' always exists")

    @property
    def weights_GS(self) -> np.ndarray:
        return self.weight_sets["base"]

    # the fast path's plans are computed from the tables and the weights: replacing either (``fit``
    # does both) drops them
    @property
    def tables(self) -> _Tables:
        return self._tables

    @tables.setter
    def tables(self, tables: _Tables):
        self._tables, self._plans = tables, {}

    @property
    def weight_sets(self) -> dict[str, np.ndarray]:
        return self._weight_sets

    @weight_sets.setter
    def weight_sets(self, sets: dict[str, np.ndarray]):
        self._weight_sets, self._plans = sets, {}

    # --- evidence (plain reference: every source materialised) ----------------------------------
    def _sources(self, prev, layer: int, known, token_ids, gate_logits_NLE) -> np.ndarray:
        """X [N, L-1-layer, S, E]: the source log-ratios for the target layers m > layer."""
        t, C = self.tables, self.config.context_layers
        N, L, E = known.shape[0], self.num_layers, self.num_experts
        first = layer + 1  # first target layer
        X = np.zeros((N, L - first, len(self.source_names), E), dtype=np.float32)
        X[:, :, 0] = t.log_pop[None, first:]
        for c in range(C):
            j = layer - c
            if j < 0:
                break
            d_lo, d_hi = layer - j + 1, min(t.span, L - 1 - j)  # targets m = j + d beyond `layer`
            if d_hi >= d_lo:
                ids = known[:, j]  # [N, K]
                rows = t.trans[j][np.maximum(ids, 0)][:, :, d_lo - 1:d_hi]  # [N, K, D, E]
                X[:, :d_hi - d_lo + 1, 1 + c] = _masked_mean(rows.transpose(0, 2, 1, 3), (ids >= 0)[:, None, :])
        if prev is not None and first < L:
            # the previous token's own experts as a 0/1 feature: a log-linear model cannot
            # express "either repeat the previous token or follow the other evidence" with
            # log-probabilities alone, an indicator with its own weight can
            X[:, :, C + 1] = multi_hot(prev[:, first:], E)
        if token_ids is not None and t.buckets:
            X[:, :, C + 2] = t.token[np.mod(np.asarray(token_ids, dtype=np.int64), t.buckets), first:]
        if gate_logits_NLE is not None:
            X[:, :, C + 3] = self._gate_source(gate_logits_NLE[:, first:], first)
        if layer >= C:  # layer 0 has left the recent window: keep it as an anchor
            d_hi = min(t.span, L - 1)
            if d_hi >= first:
                ids = known[:, 0]
                rows = t.trans[0][np.maximum(ids, 0)][:, :, first - 1:d_hi]  # [N, K, D, E]
                X[:, :d_hi - first + 1, C + 4] = _masked_mean(rows.transpose(0, 2, 1, 3), (ids >= 0)[:, None, :])
        for col, j, lo, rows in self._match_evidence(layer, known, prev):
            X[:, :rows.shape[1] - lo, col] = rows[:, lo:]
        return X

    def _match_evidence(self, layer: int, known: np.ndarray, prev: np.ndarray | None = None):
        """(source column, layer j, first useful row, rows [N, span', E]) for each exact-set source.

        Row d - 1 of j's table targets layer j + d; targets start at layer + 1, so row layer - j.
        """
        t, C, Mt = self.tables, self.config.context_layers, self.config.match_layers
        L = self.num_layers
        if not Mt:
            return []
        out = []
        first = layer + 1
        if prev is not None and first < L and t.successor.num_keys:
            u = t.successor.lookup(0, prev[:, 0])  # the previous token's layer-0 set
            # row m targets layer m; like every table, no further than max_span layers ahead
            out.append((C + 7 + Mt, 0, first, t.successor.rows_UDE[u, :min(L, first + self.config.max_span)]))
        js = [(C + 5 + c, layer - c) for c in range(Mt) if layer - c >= 0]
        if layer >= Mt:  # layer 0 has left the window: its set is the token's fingerprint
            js.append((C + 5 + Mt, 0))
        sid = np.full((len(known), layer + 1), t.match.num_keys, dtype=np.int64)
        for col, j in js:
            sid[:, j] = t.match.lookup(j, known[:, j])
            d_hi = min(t.span, L - 1 - j)
            if d_hi >= layer - j + 1:
                out.append((col, j, layer - j, t.match.rows_UDE[sid[:, j], :d_hi]))
        if t.match.has_paths and 0 <= layer < L - 1:
            cfg = self.config
            for j in (layer - 1, layer - 2, layer - 3):  # the pools are ordered by the sets of the layers before
                if j >= 0 and j not in {jj for _, jj in js}:
                    sid[:, j] = t.match.lookup(j, known[:, j])
            counts, n = t.match.neighbour_counts(layer, sid, known, cfg.match_pool, cfg.match_neighbours,
                                                 0.7, cfg.match_depth, cfg.match_second_pool, ahead=cfg.max_span)
            # smoothed log P(e at m | the neighbours) - log pop, only for tokens that found neighbours
            rows = np.zeros_like(counts)
            hit = np.flatnonzero(n > 0)
            if len(hit):
                a, log_pop = cfg.match_smoothing, torch.from_numpy(t.log_pop[layer + 1:layer + 1 + counts.shape[1]])
                c = torch.from_numpy(counts[hit])
                denom = torch.from_numpy((n[hit] + a).astype(np.float32))[:, None, None]
                rows[hit] = (torch.log((c + a * log_pop.exp()) / denom) - log_pop).numpy()
            out.append((C + 6 + Mt, layer, 0, rows))
        return out

    def _gate_source(self, logits_NME: np.ndarray, first: int) -> np.ndarray:
        z = logits_NME - logits_NME.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True)) + np.log(self.top_k)
        return np.maximum(logp, _LOG_FLOOR) - self.tables.log_pop[None, first:]

    def _scores_reference(self, prev, layer, known, tok, gate) -> np.ndarray:
        W, use_tok, use_gate = self._weights(tok is not None and self.tables.buckets > 0, gate is not None)
        X = self._sources(prev, layer, known, tok if use_tok else None, gate if use_gate else None)
        return np.einsum("nmse,ms->nme", X, W[self._groups(layer)[layer + 1:]])

    # --- evidence (fast path: per-layer plans, each source weighted as it is gathered) -----------------
    def _plan(self, has_tok: bool, has_gate: bool, layer: int) -> "_Plan":
        key = (has_tok, has_gate, layer)
        plan = self._plans.get(key)
        if plan is None:
            W, use_tok, use_gate = self._weights(has_tok, has_gate)
            plan = self._plans[key] = _Plan(self, W[self._groups(layer)[layer + 1:]], layer, use_tok, use_gate)
        return plan

    def _scores(self, plan: "_Plan", prev, layer, known, tok, gate) -> np.ndarray:
        """Equals ``_scores_reference`` (tested): [N, L-1-layer, E] scores, without the [N, M, S, E]
        tensor of sources. At a few tokens a prediction costs its number of array operations (each
        ~1-2 us), at many its passes over [N, M, E]: what depends on the tables and weights only is in
        the layer's ``_Plan``, each source is weighted as it is gathered, the pairwise sources are one
        gather, the set lookups of every layer one search."""
        t, cfg, E = self.tables, self.config, self.num_experts
        N, M, R, first = len(known), plan.M, plan.R, layer + 1
        # the scores, contiguous (numpy is several times slower on strided ones at many tokens), and one
        # spare element after them: where the repeat source's absent experts (-1) land
        buf = np.empty(N * M * E + 1, dtype=np.float32)
        zE = buf[:-1].reshape(N, M, E)
        if plan.use_tok:  # popularity and the token id's row start the scores
            np.multiply(t.token[np.mod(np.asarray(tok, dtype=np.int64), t.buckets), first:], plan.w_tok, out=zE)
            zE += plan.z0
        else:
            zE[:] = plan.z0
        if len(plan.t_js):
            # the pairwise sources: per (token, target row) the k table rows of each source layer, each
            # weighted by the source's weight over k (the mean), summed; id -1 reads its table's zero row E
            ids = known[:, plan.t_js]  # [N, Jt, K]
            if np.logical_and.reduce(ids >= 0, axis=None) and ids.shape[-1] == self.top_k:
                idx = plan.t_base + ids[:, None] * t.span  # [N, R, Jt, K]
                w = plan.t_w  # [R, 1, Jt * K]: the same for every token
            else:
                ok = ids >= 0
                idx = plan.t_base + np.where(ok, ids, E)[:, None] * t.span
                inv = 1 / np.maximum(ok.sum(-1), 1).astype(np.float32)  # [N, Jt]
                w = np.repeat(plan.t_coef * inv[:, None, :, None], ids.shape[-1], -1).reshape(N, R, 1, -1)
            if idx.size <= _GATHER_ROWS:  # one token: a numpy gather and product beat embedding_bag's fixed cost
                zE[:, :R] += (w @ plan.trans_np[idx.reshape(N, R, -1)])[:, :, 0]
            else:  # embedding_bag sums as it gathers: no [N, R, Jt * K, E] copy
                psw = np.repeat(w.reshape(-1, R, idx.shape[2] * idx.shape[3]), N if w.ndim == 3 else 1, 0)
                rows = F.embedding_bag(torch.from_numpy(idx.reshape(N * R, -1)), plan.trans_rows, mode="sum",
                                       per_sample_weights=torch.from_numpy(psw.reshape(N * R, -1)))
                zE[:, :R] += rows.numpy().reshape(N, R, E)
        if prev is not None:
            # repeat: the weight added once at each expert of the previous token (a repeated expert too:
            # one assignment per element, as multi_hot's 1); a flat index, the fastest numpy scatter
            p = prev[:, first:]  # [N, M, K]
            buf[np.where(p >= 0, p + plan.rep_off + (np.arange(N) * (M * E))[:, None, None], N * M * E)] += plan.w_rep
        if plan.use_gate:
            zE += self._gate_source(gate[:, first:], first) * plan.w_gate
        succ = prev is not None and plan.succ
        if len(plan.look_layers) or succ:  # the set masks: the known layers', then the previous token's layer 0
            q = _masks(np.concatenate([known[:, plan.mask_layers], prev[:, :1]], 1) if succ
                       else known[:, plan.mask_layers], E)  # [N, J, words]
        if len(plan.look_layers):
            sid = t.match.lookup_many(plan.look_layers, q[:, :len(plan.look_layers)])  # [N, J']
            if len(plan.m_pos):
                rows = t.match.rows_UDE[sid[:, None, plan.m_pos], plan.m_d]  # [N, R, Jm, E]
                zE[:, :R] += np.einsum("nrje,rj->nre", rows, plan.m_coef)
            if plan.nb:
                sid_all = np.full((N, first), t.match.num_keys, dtype=np.int64)
                sid_all[:, list(plan.look_layers)] = sid
                counts, n = t.match.neighbour_counts_fast(
                    layer, sid_all, known, cfg.match_pool, cfg.match_neighbours, 0.7, cfg.match_depth,
                    cfg.match_second_pool, ahead=cfg.max_span,
                    masks_NJW=q[:, len(plan.look_layers):len(plan.mask_layers)])
                hit = n > 0
                if hit.any():  # smoothed log P(e at m | the neighbours) - log pop, tokens without neighbours: 0
                    counts += plan.nb_apop
                    counts /= (n + cfg.match_smoothing).astype(np.float32)[:, None, None]
                    np.log(counts, out=counts)
                    counts -= plan.nb_log_pop
                    counts *= plan.nb_coef * hit[:, None, None]
                    zE[:, :R] += counts
        if succ:
            u = t.successor.lookup_many((0,), q[:, -1:])  # [N, 1]: the previous token's layer-0 set
            rows = t.successor.rows_UDE[u, plan.s_rows]  # [N, R, E]
            rows *= plan.s_coef
            zE[:, :R] += rows
        return zE

    def _groups(self, layer: int) -> np.ndarray:
        """[L] weight group of each target layer (entries <= layer unused)."""
        L = self.num_layers
        m = np.arange(L)
        return np.where(layer >= 0, np.clip(m - layer, 1, L - 1) - 1, L - 1 + m)

    def _gate_logits(self, layer, features, N):
        if self.lookahead is None or features is None or layer < 0 or features.get("hidden_NLD") is None:
            return None
        return self.lookahead.lookahead_logits(np.asarray(features["hidden_NLD"])[:, layer], layer)

    def predict_batch(self, prev_paths_NLK, layer, known_NlK, features: dict | None = None) -> np.ndarray:
        prev, known = check_inputs(self, prev_paths_NLK, layer, known_NlK)
        tok = None if features is None else features.get("token_ids")
        gate = self._gate_logits(layer, features, known.shape[0])
        if self.reference:
            score = self._scores_reference(prev, layer, known, tok, gate)
            probs = torch.zeros(known.shape[0], self.num_layers, self.num_experts)
            # k times the softmax: the expected use of each expert (sums to k, clipped at 1)
            probs[:, layer + 1:] = torch.softmax(torch.as_tensor(score), -1).mul_(self.top_k).clamp_(max=1.0)
            return finish(self._direct(probs.numpy(), layer, gate), layer, known)
        # the same, written in place
        N, L, E, first = known.shape[0], self.num_layers, self.num_experts, layer + 1
        probs = np.empty((N, L, E), dtype=np.float32)
        if not N:
            return probs
        if first == L:
            probs[:] = multi_hot(known, E)
            return probs
        plan = self._plan(tok is not None and self.tables.buckets > 0, gate is not None, layer)
        if layer >= 0:  # the known rows' one-hot; an absent expert (-1) marks a target row, overwritten below
            probs[:, :first] = 0.0
            hot = np.where(known >= 0, known + plan.known_off, first * E)  # [N, l, K] in a token's flat probs
            probs.reshape(N, -1)[np.arange(N)[:, None, None], hot] = 1.0
        z = torch.from_numpy(self._scores(plan, prev, layer, known, tok, gate))  # [N, L - first, E]
        # k times the softmax (the expected use of each expert), clipped at 1 (torch's exp: 2x numpy's)
        torch.from_numpy(probs)[:, first:] = torch.softmax(z, -1).mul_(self.top_k).clamp_(max=1.0)
        return self._direct(probs, layer, gate)

    def _direct(self, probs_NLE: np.ndarray, layer: int, gate_NLE: np.ndarray | None) -> np.ndarray:
        """The target rows where the fit chose the lookahead's own answer: k times its softmax, clipped at 1
        (what ``GateLookahead.predict_batch`` gives)."""
        if gate_NLE is None or layer < 0 or layer >= self.num_layers - 1:
            return probs_NLE
        rows = layer + 1 + np.flatnonzero(self.direct_LD[layer, :self.num_layers - 1 - layer])
        if len(rows):
            z = torch.from_numpy(np.ascontiguousarray(gate_NLE[:, rows], dtype=np.float32))
            probs_NLE[:, rows] = torch.softmax(z, -1).mul_(self.top_k).clamp_(max=1.0).numpy()
        return probs_NLE

    # --- training ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, trace: RoutingTrace, config: PredictorConfig | None = None, features: dict | None = None,
            lookahead: GateLookahead | None = None, verbose: bool = False) -> "PathPredictor":
        """Count the tables and fit the weights. ``features["hidden_NLD"]`` [T, L, D] + ``lookahead``
        enable the gate source."""
        cfg = config or PredictorConfig()
        L, T, K = trace.expert_ids.shape
        if T < 2:
            raise ValueError(f"the trace holds {T} token(s); record more to train a predictor")
        req = trace.request_ids_or_default()
        if len(np.unique(req)) >= 2:
            count_part, fit_part = trace.split_requests(1.0 - cfg.holdout, seed=cfg.seed)
            count_idx = np.flatnonzero(np.isin(req, np.unique(count_part.request_ids_or_default())))
        else:  # a single request: split it in time
            cut = max(1, int(T * (1.0 - cfg.holdout)))
            count_idx = np.arange(cut)
        fit_idx = np.setdiff1d(np.arange(T), count_idx)
        n_src = 1 + cfg.context_layers + 4 + (cfg.match_layers + 3 if cfg.match_layers else 0)
        w0 = np.ones((2 * L - 1, n_src), dtype=np.float32)
        # the set-match sources start at weight 0: the ridge pulls toward the start, and on a small or
        # structureless trace their rows are mostly noise (the pairwise sources start at 1, a product)
        w0[:, 1 + cfg.context_layers + 4:] = 0.0
        model = cls(_Tables(trace.select_tokens(count_idx), cfg), {"base": w0}, K, cfg, lookahead)
        model._fit_weights(trace, fit_idx, features, verbose)
        model._choose_direct(trace, fit_idx, features, verbose)
        model.tables = _Tables(trace, cfg)  # final tables from every token
        return model

    def _fit_weights(self, trace: RoutingTrace, fit_idx: np.ndarray, features: dict | None, verbose: bool):
        cfg, L, E, K = self.config, self.num_layers, self.num_experts, self.top_k
        S = len(self.source_names)
        rng = np.random.default_rng(cfg.seed)
        paths = trace.paths().astype(np.int64)
        prev_idx = trace.previous_token_index()
        hidden = None if features is None else features.get("hidden_NLD")
        rows_total = max(cfg.fit_elements // (S * E), L)
        rows_per_layer = rows_total // max(1, L * (L + 1) // 2)  # targets beyond layer l: L-1-l
        Xs, Ys, Gs = [], [], []
        for layer in range(-1, L - 1):
            n = int(min(len(fit_idx), max(8, rows_per_layer)))
            tok = np.sort(rng.choice(fit_idx, size=n, replace=False))
            prev = np.where(prev_idx[tok, None, None] >= 0, paths[np.maximum(prev_idx[tok], 0)], -1)
            tid = None if trace.token_ids is None else trace.token_ids[tok]
            gate = (None if hidden is None or self.lookahead is None or layer < 0
                    else self.lookahead.lookahead_logits(np.asarray(hidden)[tok, layer], layer))
            X = self._sources(prev, layer, paths[tok, :layer + 1], tid, gate)
            Xs.append(X.reshape(-1, S, E))
            Ys.append(multi_hot(paths[tok, layer + 1:], E).reshape(-1, E))
            Gs.append(np.broadcast_to(self._groups(layer)[layer + 1:], (n, L - 1 - layer)).reshape(-1))
        X = np.concatenate(Xs)  # [R, S, E]
        Y = np.concatenate(Ys)  # [R, E]
        G = np.concatenate(Gs).astype(np.int64)  # [R]
        C = cfg.context_layers
        tok_col, gate_col = C + 2, C + 3
        has_tok = trace.token_ids is not None and self.tables.buckets > 0
        has_gate = hidden is not None and self.lookahead is not None
        # the set-match sources get a stronger pull toward 0: their rows come from few stored tokens
        # each, so on a small trace a weight fitted freely mostly fits noise
        ridge = np.ones(S)
        ridge[1 + C + 4:] = cfg.match_ridge
        sets = {}
        for use_tok in ((False, True) if has_tok else (False,)):
            for use_gate in ((False, True) if has_gate else (False,)):
                key = "+".join(n for n, on in (("token", use_tok), ("gate", use_gate)) if on) or "base"
                Xk = X
                if not (use_tok and use_gate) and (has_tok or has_gate):
                    Xk = X.copy()
                    Xk[:, tok_col] *= use_tok
                    Xk[:, gate_col] *= use_gate
                w0 = self.weights_GS.astype(np.float64).copy()
                w0[:, tok_col] *= use_tok  # an unused source keeps weight 0
                w0[:, gate_col] *= use_gate
                theta, loss = newton_softmax(Xk, Y, G, w0, cfg.fit_iters, ridge)
                sets[key] = theta.astype(np.float32)
                if verbose:
                    print(f"fitted {theta.size} weights ({key}) on {len(X)} (token, layer) rows: loss {loss:.4f}")
        self.weight_sets = sets

    def _choose_direct(self, trace: RoutingTrace, fit_idx: np.ndarray, features: dict | None, verbose: bool):
        """Per known layer and distance, keep the lookahead's own answer where its top-k recall on the fit
        tokens (held out from the counted tables) beats the predictor's. Needs the gate source."""
        hidden = None if features is None else features.get("hidden_NLD")
        L, K = self.num_layers, self.top_k
        self.direct_LD = np.zeros((L - 1, L - 1), bool)
        if hidden is None or self.lookahead is None or not len(fit_idx):
            return
        rng = np.random.default_rng(self.config.seed + 1)
        tok = np.sort(rng.choice(fit_idx, size=min(len(fit_idx), _DIRECT_TOKENS), replace=False))
        true, prev, feats, _ = token_inputs(trace, features, index=tok)  # true: [n, L, K]
        # distances compared: a probe's span (beyond it the probes answer popularity), else as far as the
        # pairwise tables reach (the top-k sort of every later layer at every known layer would cost a deep
        # model's fit minutes: 58 layers x 256 experts, 49 of 68 s on the dev CPU)
        reach = getattr(self.lookahead, "span", None) or self.config.max_span
        for layer in range(L - 1):
            known, hi = true[:, :layer + 1], min(L, layer + 1 + reach)
            mine = _topk_recall(self.predict_batch(prev, layer, known, feats)[:, layer + 1:hi], true[:, layer + 1:hi], K)
            look = _topk_recall(self.lookahead.predict_batch(prev, layer, known, feats)[:, layer + 1:hi],
                                true[:, layer + 1:hi], K)
            self.direct_LD[layer, :hi - layer - 1] = look > mine
        if verbose:
            print(f"the lookahead answers alone at {int(self.direct_LD[:, 0].sum())} of {L - 1} known layers one "
                  f"ahead, {int(self.direct_LD.sum())} (layer, distance) pairs in all")

    # --- disk -------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        header = {"format": _FORMAT, "version": _VERSION, "top_k": self.top_k, "config": asdict(self.config),
                  "weight_sets": sorted(self.weight_sets)}
        if getattr(self.lookahead, "reads_attention", False):  # its features carry point C's logits (load wraps it)
            header["lookahead"] = "attention"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                            **{f"weights_{k}": w for k, w in self.weight_sets.items()}, **self.tables.arrays(),
                            direct_LD=self.direct_LD)
        return path

    @classmethod
    def load(cls, path: str | Path, lookahead: GateLookahead | None = None) -> "PathPredictor":
        header, arrays = read_npz(path, "PathPredictor", "train one with `moe predictor train`",
                                  required=("weights_base",))
        if header.get("format") != _FORMAT or header.get("version") not in (1, 2, _VERSION):
            raise ValueError(f"{path} is not a moeflow PathPredictor v{_VERSION} file "
                             f"(format {header.get('format')!r} v{header.get('version')})")
        sets = {k: arrays[f"weights_{k}"] for k in header.get("weight_sets", ["base"])}
        cfg = dict(header["config"])
        if header["version"] == 1:
            cfg["match_layers"] = 0  # v1 had no exact-set sources (its weights have no columns for them)
        tables = _Tables.from_arrays(arrays)
        if header.get("lookahead") == "attention" and not getattr(lookahead, "reads_attention", False):
            # fitted on point C's logits over its probes (`moe predictor train --attention`): read them again so
            from .baselines import AttentionLookahead
            L, E = tables.log_pop.shape
            lookahead = AttentionLookahead(L, E, int(header["top_k"]), base=lookahead)
        return cls(tables, sets, int(header["top_k"]), PredictorConfig(**cfg), lookahead,
                   direct_LD=arrays.get("direct_LD"))  # v1/v2: the predictor's answer everywhere
