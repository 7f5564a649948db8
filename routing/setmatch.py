"""Exact expert-set matching: what the stored tokens that took this very set went on to use.

The idea of MoE-Infinity's trace matching (and of our nearest-stored-trace baseline), made a
table so that a lookup costs a hash instead of a scan of every stored path. On trained models
a layer's top-k set is nearly a fingerprint of the token: on the recorded 64-expert top-8 model
a layer holds only 500-4000 distinct sets over 16k tokens, and 70-98% of held-out tokens meet a
set seen in training. Pairwise tables (P(e at m | e' at j), averaged over the k experts of j)
cannot express "these k experts together", a set table can.

For each layer j and each distinct sorted set u of experts seen there, the table holds

    rows[u, d - 1, e] = log P(e at j + d | set u at j) - log pop[j + d, e]      (d = 1..span)

smoothed toward popularity by ``smoothing`` pseudo-tokens (a set seen once says less than one
seen a hundred times). Row U (the last) is all zeros: the "no match" padding row, so a lookup
that misses contributes no evidence. A set never seen is replaced by the seen set of that
layer sharing the most experts with it (at least ``min_overlap``; the more frequent on ties):
the nearest stored trace's idea, over distinct sets instead of every stored token.

Paths, not only sets: ``neighbour_counts`` ranks the stored tokens that share the token's
latest set by how many experts they share at the layers before (the nearest stored trace's
similarity, over that small pool instead of every stored token) and counts what the best few
used later: the product of per-layer evidence cannot say "these sets together", a neighbour can.

Shape legend: L = layers, T = stored tokens, K = top-k, E = experts, U = distinct (layer, set)
keys, N = tokens looked up, P = pool size, J = layers compared, R = tokens with a pool.
"""
from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=8)
def _bit_rows(num_experts: int) -> np.ndarray:
    """[E + 1, words] uint64: row e = expert e's bit (64 experts a word); row E (id -1) = no bit."""
    words = (num_experts + 63) // 64
    rows = np.zeros((num_experts + 1, words), dtype=np.uint64)
    e = np.arange(num_experts)
    rows[e, e // 64] = np.left_shift(np.uint64(1), (e % 64).astype(np.uint64))
    return rows


def _masks(ids_XK: np.ndarray, num_experts: int) -> np.ndarray:
    """[..., K] expert ids (-1 = none) -> [..., words] uint64 bit masks of the set (64 experts a word).

    One gather of per-expert bit rows and one OR over K: a decode-time lookup (one token) calls this
    several times per prediction, where the per-word loop it replaced cost ~24 us a call."""
    ids = np.asarray(ids_XK, dtype=np.int64)
    return np.bitwise_or.reduce(_bit_rows(num_experts)[np.where(ids >= 0, ids, num_experts)], axis=-2)


_SID_MASK = (1 << 21) - 1  # set ids in a pool key (2M distinct sets per model is far beyond any trace)


def _hash(masks_XW: np.ndarray) -> np.ndarray:
    """[..., words] uint64 -> [...] uint64 (the mask itself for one word; mixed words otherwise)."""
    h = masks_XW[..., 0].copy()
    with np.errstate(over="ignore"):
        for w in range(1, masks_XW.shape[-1]):
            h = (h * np.uint64(0x9E3779B97F4A7C15)) ^ masks_XW[..., w]
    return h


def _hash_at(masks_XW: np.ndarray, layer_X: np.ndarray) -> np.ndarray:
    """[..., words] uint64 masks, [...] layers -> [...] uint64: the layer and the words mixed, so the
    sets of every layer can share one sorted index (a collision is caught by comparing the masks)."""
    phi = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        h = np.asarray(layer_X, dtype=np.uint64) * phi
        for w in range(masks_XW.shape[-1]):
            h = (h ^ masks_XW[..., w]) * phi
    return h


class SetMatchTable:
    def __init__(self, keys_UK: np.ndarray, layer_U: np.ndarray, rows_UDE: np.ndarray,
                 count_U: np.ndarray | None = None, sid_LT: np.ndarray | None = None,
                 paths_TLK: np.ndarray | None = None, min_overlap: int = 0):
        self.keys_UK = np.asarray(keys_UK, dtype=np.int16)
        self.layer_U = np.asarray(layer_U, dtype=np.int16)
        self.rows_UDE = np.asarray(rows_UDE, dtype=np.float32)  # [U + 1, span, E]
        U = len(self.keys_UK)
        if len(self.rows_UDE) != U + 1 or len(self.layer_U) != U:
            raise ValueError(f"inconsistent set-match arrays: {U} keys, {len(self.layer_U)} "
                             f"layers, {len(self.rows_UDE)} rows (want keys + 1 rows)")
        self.count_U = np.ones(U, np.int32) if count_U is None else np.asarray(count_U, np.int32)
        self.span = self.rows_UDE.shape[1]
        self.num_experts = self.rows_UDE.shape[2]
        self.min_overlap = int(min_overlap)
        # the index is rebuilt from the arrays (nothing is pickled): per layer, the sets' expert bit
        # masks hashed to one word and sorted, so a batch of lookups is one searchsorted
        self._index = {}  # layer -> (sorted hashes [U_j], global ids in that order, masks [U_j, words])
        self._by_count = {}  # layer -> (positions in _index[layer], their masks), most frequent set first
        for j in np.unique(self.layer_U):
            g = np.flatnonzero(self.layer_U == j)
            masks = _masks(self.keys_UK[g], self.num_experts)
            h = _hash(masks)
            # sorted by hash; equal hashes (never seen in practice) keep the most frequent set first
            order = np.lexsort((-self.count_U[g], h))
            self._index[int(j)] = (h[order], g[order], masks[order])
            by_count = np.argsort(-self.count_U[g[order]], kind="stable")
            # (positions, masks) most frequent set first: the nearest-set search of every miss
            self._by_count[int(j)] = (by_count, masks[order][by_count])
        # the fast path's index (``lookup_many``): the sets of every layer that the layer's own search
        # finds (of equal hashes, the first) in one sorted array of layer-seeded hashes, so the lookups
        # of all the layers a prediction needs are one search; and each layer's masks word-major
        # [words, U_j], most frequent first, for the nearest-set scan (a popcount summed over a
        # length-words last axis costs 10x the same over a long one)
        seen = [(g[np.r_[True, h[1:] != h[:-1]]], j) for j, (h, g, _) in self._index.items()]
        g_U = np.concatenate([g for g, _ in seen] + [np.zeros(0, np.int64)])
        layer_U = np.concatenate([np.full(len(g), j) for g, j in seen] + [np.zeros(0, np.int64)])
        masks_U = _masks(self.keys_UK[g_U], self.num_experts)
        h_U = _hash_at(masks_U, layer_U)
        order = np.argsort(h_U, kind="stable")
        # and a last row no query matches (layer -1) where the search runs past the end
        self._flat = (h_U[order], np.r_[g_U[order], 0], np.concatenate([masks_U[order], masks_U[:1] * 0]),
                      np.r_[layer_U[order], -1])
        self._by_count_T = {j: np.ascontiguousarray(m.T) for j, (_, m) in self._by_count.items()}
        self._exact = {}  # layer -> {mask bytes: row}, built on first use (``_exact_sets``)
        # stored paths for the neighbours: each stored token's set id per layer [L, T], its path
        self.sid_LT = None if sid_LT is None else np.asarray(sid_LT, dtype=np.int32)
        self.paths_TLK = None if paths_TLK is None else np.asarray(paths_TLK, dtype=np.int16)
        self.has_paths = self.paths_TLK is not None
        self._masks_TLW = _masks(self.paths_TLK, self.num_experts) if self.has_paths else None
        # layer -> (pool keys sorted, the stored tokens in that order): the tokens sharing a set at
        # layer j form one run, ordered inside by their sets at j - 1 and j - 2 (``pool_key``)
        self._pool = {}
        for j in range(self.sid_LT.shape[0] - 1 if self.has_paths else 0):
            key = self.pool_key(self.sid_LT[:j + 1].T, j)
            order = np.argsort(key, kind="stable")
            self._pool[j] = (key[order], order.astype(np.int32))
        # every layer's pool in one array (``neighbour_counts_fast``): a layer's keys start with its set
        # ids, which exceed the layer before's, so the concatenation is sorted and one search serves
        # the runs of two layers
        self._pool_flat = None
        self._nb_consts = {}  # ``neighbour_counts_fast``'s constants per (layer, ...) and per pool widths
        if self._pool:
            keys = np.concatenate([self._pool[j][0] for j in sorted(self._pool)])
            assert (np.diff(keys) >= 0).all(), "set ids must grow with the layer (as count() numbers them)"
            order = np.concatenate([self._pool[j][1] for j in sorted(self._pool)])
            self._pool_flat = (keys, np.r_[order, np.zeros(len(order) + 1, order.dtype)])  # room for any pool

    def pool_key(self, sid_Nl: np.ndarray, layer: int) -> np.ndarray:
        """[N] int64 (set id at layer, at layer - 1, at layer - 2), 21 bits each (unseen: all ones)."""
        key = np.zeros(len(sid_Nl), dtype=np.int64)
        for j in (layer, layer - 1, layer - 2):
            part = np.minimum(sid_Nl[:, j], _SID_MASK) if j >= 0 else np.zeros(len(sid_Nl), np.int64)
            key = (key << 21) | part.astype(np.int64)
        return key

    @classmethod
    def count(cls, ids_LTK: np.ndarray, num_experts: int, log_pop_LE: np.ndarray, span: int,
              smoothing: float, keep_paths: bool = True, min_overlap: int | None = None,
              key_layers: int | None = None) -> "SetMatchTable":
        """Count the table from a trace's expert ids (``log_pop_LE``: log expected use per token).

        key_layers: only layers 0..key_layers-1 are keys (default: every layer but the last)."""
        ids = np.sort(np.asarray(ids_LTK, dtype=np.int64), axis=-1)  # a set's key is its sorted ids
        L, T, K = ids.shape
        E, a = num_experts, smoothing
        pop = np.exp(log_pop_LE.astype(np.float64))
        keys, layers, rows, counts = [], [], [], []
        sid = np.zeros((L, T), dtype=np.int32)
        offset = 0
        for j in range(L - 1 if key_layers is None else min(key_layers, L - 1)):
            uniq, inv = np.unique(ids[j], axis=0, return_inverse=True)
            inv = inv.reshape(-1)
            U = len(uniq)
            sid[j] = inv + offset
            offset += U
            n_U = np.bincount(inv, minlength=U).astype(np.float64)
            counts.append(n_U.astype(np.int32))
            r = np.zeros((U, span, E), dtype=np.float32)
            for d in range(1, min(span, L - 1 - j) + 1):
                m = j + d
                tgt = ids[m]  # [T, K]
                ok = tgt >= 0
                code = (np.broadcast_to(inv[:, None], tgt.shape) * E + tgt)[ok]
                joint = np.bincount(code, minlength=U * E).reshape(U, E)
                p = (joint + a * pop[m]) / (n_U[:, None] + a)
                r[:, d - 1] = np.log(np.maximum(p, 1e-30)) - log_pop_LE[m]
            keys.append(uniq.astype(np.int16))
            layers.append(np.full(U, j, dtype=np.int16))
            rows.append(r)
        rows.append(np.zeros((1, span, E), dtype=np.float32))  # the no-match row
        empty = np.zeros((0, K), dtype=np.int16)
        return cls(np.concatenate(keys) if keys else empty,
                   np.concatenate(layers) if layers else np.zeros(0, np.int16), np.concatenate(rows),
                   np.concatenate(counts) if counts else np.zeros(0, np.int32),
                   sid if keep_paths else None,
                   np.asarray(ids_LTK, np.int16).transpose(1, 0, 2) if keep_paths else None,
                   (K + 1) // 2 if min_overlap is None else min_overlap)

    @property
    def num_keys(self) -> int:
        return len(self.keys_UK)

    def lookup(self, layer: int, ids_NK: np.ndarray) -> np.ndarray:
        """[N] row of each token's set at ``layer``: its own if seen, else the nearest seen set's
        (``num_keys`` = none near enough: the zero row)."""
        ids = np.asarray(ids_NK)
        miss = self.num_keys
        u = np.full(len(ids), miss, dtype=np.int64)
        if layer in self._index:
            h_U, g_U, masks_U = self._index[layer]
            q = _masks(ids, self.num_experts)
            at = np.minimum(np.searchsorted(h_U, _hash(q)), len(h_U) - 1)
            same = (masks_U[at] == q).all(-1)  # the hash found a candidate; the masks confirm it
            u[same] = g_U[at[same]]
            lost = np.flatnonzero(~same)
            if len(lost) and self.min_overlap:
                # shared experts with every seen set of the layer: popcount of the masks' AND; ties go
                # to the more frequent set (a stable argmax over sets ordered by count)
                by_count, masks_by_count = self._by_count[layer]
                shared = np.bitwise_count(masks_by_count[None] & q[lost][:, None]).sum(-1)  # [lost, U_j]
                arg = shared.argmax(1)
                near = shared[np.arange(len(lost)), arg] >= self.min_overlap
                u[lost[near]] = g_U[by_count[arg[near]]]
        return u

    def lookup_many(self, layers_J, masks_NJW: np.ndarray) -> np.ndarray:
        """[N, J] ``lookup(layers_J[i], ids)[n]`` for every token n and layer i at once (tested), from
        the sets' bit masks (``_masks`` of the ids); the fast path of a prediction.

        The sets ``lookup``'s hash search finds (every seen set but one hidden by a 64-bit hash
        collision) are found exactly: for a few tokens by a dict per layer (a Python lookup costs
        less than an array operation), for more by one search over every layer. The rest take
        ``lookup``'s nearest-set scan (on word-major masks; an empty set shares nothing and skips it)."""
        layers = tuple(int(j) for j in layers_J)
        q = np.asarray(masks_NJW)
        N, J, W = q.shape
        if not self.num_keys or not N * J:
            return np.full((N, J), self.num_keys, dtype=np.int64)
        joint = N * J > 32
        if not joint:
            step, raw = 8 * W, q.tobytes()
            exact = [self._exact_sets(j) for j in layers]
            u = np.array([exact[i % J].get(raw[i * step:(i + 1) * step], -1) for i in range(N * J)],
                         dtype=np.int64).reshape(N, J)
            miss = u < 0
        else:
            h_U, g_U, masks_U, layer_U = self._flat  # padded with a row no query matches (layer -1)
            at = np.searchsorted(h_U, _hash_at(q, np.asarray(layers, dtype=np.uint64)))  # [N, J]
            miss = ~((masks_U[at] == q).all(-1) & (layer_U[at] == layers))
            u = g_U[at]
        if not miss.any():
            return u
        u[miss] = self.num_keys
        for i in np.flatnonzero(miss.any(0)):  # the layers with a set not found exactly
            j, rows = layers[i], np.flatnonzero(miss[:, i])
            if j not in self._index:
                continue
            hj, gj, mj = self._index[j]
            if joint:  # the layer's own search: a set the joint one lost to a collision of its hashes
                at = np.minimum(np.searchsorted(hj, _hash(q[rows, i])), len(hj) - 1)
                found = (mj[at] == q[rows, i]).all(-1)
                u[rows[found], i] = gj[at[found]]
                rows = rows[~found]
            lost = rows[q[rows, i].any(-1)]
            if len(lost) and self.min_overlap:
                by_count, mT = self._by_count[j][0], self._by_count_T[j]
                shared = np.bitwise_count(mT[0][None] & q[lost, i, 0, None])  # [lost, U_j]
                for w in range(1, W):
                    shared += np.bitwise_count(mT[w][None] & q[lost, i, w, None])
                arg = shared.argmax(1)  # the first maximum: the more frequent set on ties, as lookup
                near = shared[np.arange(len(lost)), arg] >= self.min_overlap
                u[lost[near], i] = gj[by_count[arg[near]]]
        return u

    def _exact_sets(self, layer: int) -> dict:
        """{mask bytes: row} of the layer's sets that ``lookup``'s hash search finds, built on first use."""
        d = self._exact.get(layer)
        if d is None:
            d = {}
            if layer in self._index:
                h, g, masks = self._index[layer]
                first = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])  # of equal hashes lookup sees the first
                d = {masks[i].tobytes(): int(g[i]) for i in first}
            self._exact[layer] = d
        return d

    def _run(self, j: int, sid_Nl: np.ndarray, pool: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``pool`` stored tokens sharing each token's set at layer j, those that share its sets
        at j - 1 and j - 2 too first: (members [N, P], valid [N, P])."""
        keys, order = self._pool[j]
        s = sid_Nl[:, j]
        lo = np.searchsorted(keys, s << 42, "left")
        hi = np.where(s < self.num_keys, np.searchsorted(keys, (s + 1) << 42, "left"), lo)
        P = int(min(pool, max(int((hi - lo).max(initial=0)), 1)))
        # start at the tokens that share the earlier sets too; shift left where the run ends first
        at = np.searchsorted(keys, self.pool_key(sid_Nl, j), "left")
        start = np.maximum(lo, np.minimum(at, hi - P))
        slot = start[:, None] + np.arange(P)[None]
        return order[np.clip(slot, 0, len(order) - 1)], slot < hi[:, None]

    def neighbour_counts(self, layer: int, sid_Nl: np.ndarray, known_NlK: np.ndarray, pool: int, neighbours: int,
                         decay: float, depth: int, second_pool: int = 0,
                         ahead: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The nearest stored paths among those sharing the token's set at ``layer``.

        The pool: up to ``pool`` stored tokens whose set at ``layer`` is the token's (``sid_Nl``:
        the token's set ids at layers 0..layer after nearest-set substitution, ``num_keys`` where
        unknown), those that also share its sets at layer - 1 and layer - 2 first; plus up to
        ``second_pool`` that share its set at layer - 1 instead. They are ranked by the experts
        they share with the token at ``layer`` and the ``depth`` known layers before, layer j
        weighted ``decay ** (layer - j)`` (the nearest-stored-trace baseline's similarity, over a
        pool instead of every stored token: its best matches nearly always share a recent set).
        Returns the counts [N, M, E] of the experts the best ``neighbours`` used at the next
        M = min(L-1-layer, ``ahead``) layers, and their number [N].
        """
        N, E = len(sid_Nl), self.num_experts
        L = self.paths_TLK.shape[1]
        M = L - 1 - layer if ahead is None else min(L - 1 - layer, ahead)
        counts = np.zeros((N, M, E), dtype=np.float32)
        n = np.zeros(N, dtype=np.int64)
        if layer not in self._pool or M <= 0:
            return counts, n
        sid = np.asarray(sid_Nl).astype(np.int64)
        rows = np.arange(N)
        members, valid = self._run(layer, sid, pool)
        if layer >= 1 and second_pool and layer - 1 in self._pool:
            # tokens whose latest set was noisy: the stored tokens sharing the set before it (those
            # sharing the latest one are in the first run already)
            m2, v2 = self._run(layer - 1, sid, second_pool)
            v2 &= self.sid_LT[layer, m2] != sid[:, layer, None]
            members, valid = np.concatenate([members, m2], 1), np.concatenate([valid, v2], 1)
        r = np.flatnonzero(valid.any(1))
        if not len(r):
            return counts, n
        members, valid = members[r], valid[r]
        P = members.shape[1]
        j0 = max(0, layer - depth)
        # shared experts = popcount(AND) of 64-bit expert masks: a few word operations per pair
        q = _masks(np.asarray(known_NlK)[r, j0:layer + 1], E)  # [R, J, words]
        shared = np.bitwise_count(self._masks_TLW[members, j0:layer + 1] & q[:, None]).sum(-1)  # [R, P, J]
        w = decay ** np.arange(layer - j0, -1, -1, dtype=np.float64)
        # float64 and a tie-break far below any difference of two similarities: equal ones go to the
        # first run, then the earlier stored token
        sim = torch.from_numpy(shared.astype(np.float64) @ w - np.arange(P) * 1e-9)  # [R, P]
        sim[torch.from_numpy(~valid)] = -np.inf
        k = min(neighbours, P)
        top = torch.topk(sim, k, dim=1)
        chosen = torch.gather(torch.from_numpy(members.astype(np.int64)), 1, top.indices)  # [R, k]
        ok = torch.isfinite(top.values).numpy()
        ids = self.paths_TLK[chosen.numpy(), layer + 1:layer + 1 + M].astype(np.int64)  # [R, k, M, K]
        flat = torch.zeros(len(r) * M * (E + 1))
        idx = ((np.arange(len(r))[:, None, None, None] * M + np.arange(M)[None, None, :, None]) * (E + 1)
               + np.where(ids >= 0, ids, E))
        wts = np.broadcast_to(ok[:, :, None, None], idx.shape).astype(np.float32)
        flat.index_add_(0, torch.from_numpy(idx.reshape(-1)), torch.from_numpy(wts.reshape(-1).copy()))
        counts[r] = flat.view(len(r), M, E + 1)[..., :E].numpy()
        n[r] = ok.sum(1)
        return counts, n

    def neighbour_counts_fast(self, layer: int, sid_Nl: np.ndarray, known_NlK: np.ndarray, pool: int,
                              neighbours: int, decay: float, depth: int, second_pool: int = 0,
                              ahead: int | None = None,
                              masks_NJW: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``neighbour_counts`` with the same arguments and result (tested), in about 35 array
        operations whatever N: what it costs for one token is their number, not their size.

        The keys of both runs come from one small integer product and one search of every layer's
        pool at once; every token is scored (one whose runs are empty has no finite similarity, so no
        neighbour), popcounts summed over the layers and words by one product; the best
        ``neighbours`` by a partition instead of a sort (the similarities differ by the tie-break, so
        the chosen set is the same); the counts by one bincount. ``masks_NJW``: ``_masks`` of
        ``known_NlK[:, layer - depth:layer + 1]`` when the caller has them already."""
        N, E = len(sid_Nl), self.num_experts
        L = self.paths_TLK.shape[1] if self.has_paths else 0
        M = L - 1 - layer if ahead is None else min(L - 1 - layer, ahead)
        if layer not in self._pool or M <= 0 or not N:
            return np.zeros((N, max(M, 0), E), dtype=np.float32), np.zeros(N, dtype=np.int64)
        if self.num_keys > _SID_MASK:  # set ids past the key's 21 bits (far beyond any trace): pool_key's clamping
            return self.neighbour_counts(layer, sid_Nl, known_NlK, pool, neighbours, decay, depth, second_pool, ahead)
        two = bool(layer >= 1 and second_pool and layer - 1 in self._pool)
        key = (layer, two, depth, decay, M)
        c = self._nb_consts.get(key)
        if c is None:
            c = self._nb_consts[key] = self._neighbour_consts(layer, two, depth, decay, M)
        cols, to_keys, add, w, bins = c
        keys, order = self._pool_flat
        sid = np.asarray(sid_Nl)
        s = sid[:, cols]  # [N, 4] set ids at layer .. layer - 3 (layers below 0 have weight 0 in to_keys)
        nr = 2 if two else 1
        # run i (0: the token's latest set, 1: the set before) spans keys [s_i << 42, (s_i + 1) << 42) and
        # starts at the tokens that share the next two sets too: lo | hi | at, each [N, runs]. Every key
        # is below num_keys << 42, so an unseen set (num_keys) has an empty run: lo = hi = the end
        lo, hi, at = np.searchsorted(keys, s @ to_keys + add).reshape(N, 3, nr).transpose(1, 0, 2)
        most = (hi - lo).max(0)
        P_r = [int(min(p, max(int(m), 1))) for p, m in zip((pool, second_pool), most)]
        g = self._nb_consts.get(tuple(P_r))
        if g is None:  # columns: the run of each, the offset in it, the tie-break (earlier first)
            g = self._nb_consts[tuple(P_r)] = (np.repeat(np.arange(nr), P_r),
                                               np.concatenate([np.arange(p) for p in P_r]),
                                               np.arange(sum(P_r)) * 1e-9, np.asarray(P_r))
        run_of, offset, tie, P_vec = g
        start = np.maximum(lo, np.minimum(at, hi - P_vec))
        slot = start[:, run_of] + offset  # [N, P]
        members = order[slot]  # (order is padded: a slot may run past the end, where it is not valid)
        valid = slot < hi[:, run_of]
        if two:  # the second run: only the tokens that do not share the latest set (those are in the first)
            valid[:, P_r[0]:] &= self.sid_LT[layer, members[:, P_r[0]:]] != sid[:, layer, None]
        j0 = max(0, layer - depth)
        q = _masks(np.asarray(known_NlK)[:, j0:layer + 1], E) if masks_NJW is None else masks_NJW  # [N, J, W]
        both = np.bitwise_count(self._masks_TLW[members, j0:layer + 1] & q[:, None])  # [N, P, J, W]
        sim = np.where(valid, both.reshape(N, len(run_of), -1) @ w - tie, -np.inf)  # [N, P]
        k = min(neighbours, len(run_of))
        top = np.argpartition(sim, len(run_of) - k, axis=1)[:, -k:] if k < len(run_of) else np.arange(k)[None]
        rows = np.arange(N)[:, None]
        chosen, ok = members[rows, top], sim[rows, top] > -np.inf  # [N, k]
        # counts of (token n, target m) at bins (n * M + m) * (E + 1) + 1 + e: id -1 falls in the spare bin
        ids = self.paths_TLK[chosen, layer + 1:layer + 1 + M]  # [N, k, M, K]
        flat = (ids + (rows[:, :, None, None] * (M * (E + 1)) + bins)).reshape(-1)
        counts = np.bincount(flat, np.repeat(ok.reshape(-1), M * ids.shape[-1]), minlength=N * M * (E + 1))
        return counts.reshape(N, M, E + 1)[..., 1:].astype(np.float32), ok.sum(1)

    def _neighbour_consts(self, layer: int, two: bool, depth: int, decay: float, M: int) -> tuple:
        """What ``neighbour_counts_fast`` needs at ``layer`` and nothing else: the set-id columns, the
        integer map from them to the run keys, the similarity weights per (layer, word), and the
        first count bin of each target layer."""
        nr = 2 if two else 1
        cols = np.arange(layer, layer - 4, -1)
        to_keys = np.zeros((4, 3, nr), dtype=np.int64)  # set ids -> (lo, hi, at) of each run
        for i in range(nr):  # run i's key: sets i, i + 1, i + 2 (21 bits each; a layer below 0 adds 0)
            to_keys[i, :, i] = 1 << 42  # lo, hi and at all start with set i
            for shift in (1, 2):
                if cols[i + shift] >= 0:
                    to_keys[i + shift, 2, i] = 1 << (42 - 21 * shift)
        add = np.zeros((3, nr), dtype=np.int64)
        add[1] = 1 << 42  # hi: the first key of the next set id
        W, E = self._masks_TLW.shape[-1], self.num_experts
        w = np.repeat(decay ** np.arange(layer - max(0, layer - depth), -1, -1, dtype=np.float64), W)
        return np.maximum(cols, 0), to_keys.reshape(4, -1), add.reshape(-1), w, np.arange(M)[:, None] * (E + 1) + 1

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"match_keys": self.keys_UK, "match_layer": self.layer_U, "match_rows": self.rows_UDE,
               "match_count": self.count_U,
               "match_meta": np.array([self.min_overlap], dtype=np.int64)}
        if self.has_paths:
            out.update(match_sid=self.sid_LT, match_paths=self.paths_TLK)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict) -> "SetMatchTable":
        meta = arrays.get("match_meta", np.zeros(1, np.int64))
        return cls(arrays["match_keys"], arrays["match_layer"], arrays["match_rows"], arrays.get("match_count"),
                   arrays.get("match_sid"), arrays.get("match_paths"), int(meta[0]))
