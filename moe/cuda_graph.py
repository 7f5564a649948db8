"""Decode steps replayed from CUDA graphs: one graph per attention-slot bucket, captured on first use.

A decode step of a resident model is hundreds of small kernels (norms, projections, rotary, the
router, the expert kernels); at one to a few tokens per row their launch cost, not the GPU, sets
the step time. The forward with an explicit ``num_slots`` reads no device value on the host
(``MoEForCausalLM.forward``), and the ``"triton"`` expert backend neither, so one step [B, 1] can
be captured once and replayed.

    graphs = DecodeGraphs(model, cache)                       # cache = model.new_cache(B, max_len)
    logits_B1V = graphs.step(input_B1, valid_B1, max_length)  # max_length: the longest row, host-side

Attention reads ``num_slots`` cache slots, a static shape of the graph: the step rounds
``max_length + 1`` up to a multiple of ``bucket`` (slots past a row's length are masked, so the
result does not change) and keeps one graph per bucket, all in one memory pool. Capturing runs the
step once eagerly first (compilation, library handles) and then restores the cache's lengths, so
capturing changes nothing the caller sees; the written key/value slots are rewritten by the real
step. The static input buffers are copied into before each replay; the returned logits live in the
graph's output buffer and are overwritten by the next step.

What cannot be captured is refused with the reason (``graph_support``): a model on the CPU, an
expert backend that syncs with the host (``"torch"``), experts offloaded to host memory (their
cache decisions run on the host). A capture that fails anyway (some op of a model family that
reads a device value on the host) raises ``GraphCaptureError`` with the cache restored; the
``Engine`` then warns and decodes eagerly from that step on.

Offloaded (or CPU-tiered) experts decide on the host every step, so their layers cannot be inside
a graph: ``PiecewiseDecodeGraphs`` (below; ``piecewise_support``) captures everything between two
such experts calls as one piece and runs the experts eagerly in between. The ``Engine`` uses it
when the whole step cannot be captured for that reason alone.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

from .kv_cache import KVCache
from .layers import Experts


def graph_support(model: torch.nn.Module) -> str | None:
    """None when decode steps of ``model`` can be captured, else the reason they cannot."""
    dev = getattr(model, "device", None)
    if not isinstance(dev, torch.device) or dev.type != "cuda":
        return f"the model is on {dev}, not a CUDA device"
    try:
        takes_slots = "num_slots" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_slots = False
    if not takes_slots:
        return f"{type(model).__name__}.forward takes no num_slots (the sync-free forward a graph needs)"
    blocks = model.moe_blocks() if hasattr(model, "moe_blocks") else []
    for block in blocks:
        experts = block.experts
        if getattr(experts, "capturable", False):  # experts that decide on the device (offload driver='device')
            if experts.backend != "triton":
                return (f"MoE layer {block.layer_idx} uses expert backend {experts.backend!r}; only 'triton' runs "
                        "without host syncs (model.set_backend('triton'))")
            continue
        if type(experts) is not Experts:
            return (f"MoE layer {block.layer_idx} runs {type(experts).__name__} (offloaded, tiered or expert-parallel "
                    "experts decide on the host); only resident experts can be captured")
        if experts.backend != "triton":
            return (f"MoE layer {block.layer_idx} uses expert backend {experts.backend!r}; only 'triton' runs without "
                    "host syncs (model.set_backend('triton'))")
        if any(p.device.type != "cuda" for p in experts.parameters()):
            return f"MoE layer {block.layer_idx} has expert weights outside GPU memory"
    return None


class GraphCaptureError(RuntimeError):
    """Capturing a decode step failed (a host sync or an unsupported op inside the step); the cache
    is as it was before the step, so the caller can run the step eagerly instead."""


class DecodeGraphs:
    """CUDA graphs of one-token decode steps of ``model`` over ``cache`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, bucket: int = KVCache.SLOT_BUCKET):
        reason = graph_support(model)
        if reason is not None:
            raise ValueError(f"cannot capture decode steps in CUDA graphs: {reason}")
        self._setup(model, cache, bucket, capture=True)

    def _setup(self, model: torch.nn.Module, cache: KVCache, bucket: int, capture: bool) -> None:
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        self.model, self.cache, self.bucket = model, cache, bucket
        B, dev = cache.batch_size, cache.device
        self._ids_B1 = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self._valid_B1 = torch.zeros(B, 1, dtype=torch.bool, device=dev)
        self._graphs: dict = {}  # slot bucket -> what _capture made
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def slots_for(self, max_length: int) -> int:
        need = max_length + 1
        if need > self.cache.max_len:
            raise ValueError(f"KV cache full: a row would hold {need} tokens but max_len is {self.cache.max_len}; "
                             "create the cache with a larger max_len (prompt + max_new_tokens)")
        return min(-(-need // self.bucket) * self.bucket, self.cache.max_len)

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def buckets(self) -> list[int]:
        """Every slot bucket a decode step over this cache can take, shortest first."""
        M, b = self.cache.max_len, self.bucket
        return sorted({min(k * b, M) for k in range(1, -(-M // b) + 1)})

    @torch.inference_mode()
    def capture_all(self, limit: int = 64) -> int:
        """Capture the slot buckets not captured yet (shortest first, at most ``limit``; the others capture on
        first use, as always), so no request's decode step pays a capture. Returns how many were captured.
        Runs a step per bucket outside the graph first, as any capture does: call it on an idle engine."""
        if not getattr(self, "capture", True):  # pieces run eagerly: nothing to capture
            return 0
        todo = [s for s in self.buckets() if s not in self._graphs][:max(0, limit)]
        for s in todo:
            self._captured(s)
        return len(todo)

    def _forward(self, num_slots: int) -> torch.Tensor:
        return self.model(self._ids_B1, cache=self.cache, valid_BT=self._valid_B1, num_slots=num_slots)

    def _capture(self, num_slots: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph of one step and its output buffer; the cache's lengths are as before, whether
        the capture succeeds or raises (the warm-up step advanced them)."""
        lengths = self.cache.lengths.clone()
        try:
            side = torch.cuda.Stream(self.cache.device)
            side.wait_stream(torch.cuda.current_stream(self.cache.device))
            with torch.cuda.stream(side):
                self._forward(num_slots)  # compile kernels and create handles outside the capture
                self.cache.lengths.copy_(lengths)
            torch.cuda.current_stream(self.cache.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a server's other threads (metrics, request handling) may touch CUDA meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._forward(num_slots)
            return graph, out
        finally:
            self.cache.lengths.copy_(lengths)

    @torch.inference_mode()
    def step(self, input_B1: torch.Tensor, valid_B1: torch.Tensor, max_length: int) -> torch.Tensor:
        """Logits [B, 1, V] of one decode step; advances the cache like ``model(...)`` would.

        input_B1 / valid_B1: the next token of each row and whether the row takes part;
        max_length: the longest row's current length (the caller's host-side count).
        """
        graph, out = self._captured(self._inputs(input_B1, valid_B1, max_length))
        graph.replay()
        return out

    def _inputs(self, input_B1: torch.Tensor, valid_B1: torch.Tensor, max_length: int) -> int:
        """Check the step's inputs and copy them into the static buffers; returns the slot bucket."""
        if tuple(input_B1.shape) != tuple(self._ids_B1.shape) or tuple(valid_B1.shape) != tuple(self._valid_B1.shape):
            raise ValueError(f"decode step inputs must be {tuple(self._ids_B1.shape)}, got {tuple(input_B1.shape)} "
                             f"and {tuple(valid_B1.shape)}")
        num_slots = self.slots_for(max_length)
        self._ids_B1.copy_(input_B1)
        self._valid_B1.copy_(valid_B1)
        return num_slots

    def _captured(self, num_slots: int):
        """What _capture made for this bucket (captured on first use)."""
        if num_slots not in self._graphs:
            try:
                self._graphs[num_slots] = self._capture(num_slots)
            except Exception as e:  # noqa: BLE001 - reported with its cause; _capture restored the cache
                raise GraphCaptureError(f"capturing a decode step ({num_slots} slots) failed: "
                                        f"{type(e).__name__}: {e}") from e
        return self._graphs[num_slots]


# --- piecewise: graph pieces around experts that decide on the host ------------------------------
def piecewise_support(model: torch.nn.Module, need_cuda: bool = True) -> str | None:
    """None when decode steps of ``model`` can run as CUDA-graph pieces around its host-deciding
    experts (offloaded or tiered MoE layers), else the reason they cannot. need_cuda=False: the
    pieces are only to be run eagerly (any device)."""
    dev = getattr(model, "device", None)
    if need_cuda and (not isinstance(dev, torch.device) or dev.type != "cuda"):
        return f"the model is on {dev}, not a CUDA device"
    layers = getattr(model, "layers", None)
    if layers is None or not hasattr(model, "_positions_and_masks"):
        return f"{type(model).__name__} is not a MoEForCausalLM (piecewise decode drives its layers itself)"
    eager = 0
    for layer in layers:
        block = layer.mlp
        if not hasattr(block, "route"):
            continue  # a dense MLP: inside a piece
        if getattr(block.experts, "capturable", False):
            return (f"MoE layer {block.layer_idx} decides on the device (offload driver='device'): nothing to cut "
                    "around; DecodeGraphs captures the whole step with the 'triton' experts backend")
        if type(block.experts) is Experts:
            if need_cuda and (block.experts.backend != "triton"
                              or any(p.device.type != "cuda" for p in block.experts.parameters())):
                return (f"MoE layer {block.layer_idx} has resident experts that cannot be captured (backend "
                        f"{block.experts.backend!r} or weights off the GPU)")
        else:
            eager += 1
    if not eager:
        return "every MoE layer's experts are resident: DecodeGraphs captures the whole step"
    return None


class PiecewiseDecodeGraphs(DecodeGraphs):
    """Decode steps of a model whose experts decide on the host (offloaded: the cache looks at the
    routing ids every step), as CUDA-graph pieces with those experts run eagerly in between.

        graphs = PiecewiseDecodeGraphs(model, cache)          # same step() as DecodeGraphs

    Piece k replays everything from the previous host-deciding experts call to the next one (the
    rest of that MoE block, the following layers' attention, norms, dense or resident MoE MLPs, and
    the next block's router); the first piece starts with the embedding, positions, masks and
    rotary tables, the last ends with the final norm, lm_head and the cache's advance. Between two
    pieces the experts run as in eager decode, on the routing the previous piece left in its
    output buffers, and their output is copied into the buffer the next piece reads: per MoE layer
    one replay and the experts' own host work, instead of every small kernel's launch.

    Speculation (offloaded experts with ``speculate``, i.e. whole-expert slots): each piece also
    computes its experts' output as if every routed expert were resident (ids mapped to slots by
    the cache's device-side table, the others contributing zero) into the buffer the next piece
    reads. The host then looks at the routing as before; when every expert was resident it keeps
    that output (the same kernel on the same inputs as its own: no launch, ~0.1 ms of host work
    less per layer), else it computes the layer as eager decode does and overwrites the buffer.
    Before each such piece the table is made current and the stream waits for the copies into
    the layer's slots (``prepare_speculation``).

    Run-ahead (run_ahead=True, for layers whose experts read nothing from the device but the
    ids: ``can_run_ahead``): the routing ids of a speculating layer go to a pinned host buffer and
    the next piece is queued at once, on the speculation; only then does the host wait for the
    ids (not for that piece) and do the layer's bookkeeping, so the GPU runs the next piece
    meanwhile instead of idling. When the speculation is not kept (a miss, or a copy into the
    layer since its table was made current), the layer is computed as usual and the next piece
    runs again: it rewrites the same KV slots and buffers. The last piece (it advances the cache)
    is never queued ahead. (Run eagerly, capture=False, a rerun calls the piece's modules again,
    so forward hooks on them fire twice; the Engine never uses pieces on a hooked model.)
    A rerun costs the GPU a wasted piece ahead of the miss's own work, so run-ahead pays only
    where speculations are mostly kept: each layer keeps a moving share of its kept speculations
    (updated whether it ran ahead or not), and runs ahead while that share is at least
    ``run_ahead_min_kept`` (0: always). On Qwen3-30B-A3B at 25% of the experts with synthetic
    routing, run-ahead read 40.3-42.6 ms a step against 30.8-40.3 serial (BENCHMARKS 3i).

    Next-layer guesses (offloaded experts with a next router: prefetch='next_layer_gate', 'attention', 'probe', or
    ``set_next_router``): the piece that routes layer l also runs its guess of layer l+1's experts
    (``guess_next``) and puts it beside the routing ids, so the host reads both in one copy and
    issues the prefetch without launching the router or syncing again. Set the next routers before
    the pieces are captured. Such layers do not run ahead (``can_run_ahead``).

    Everything one piece hands to a later one (the residual stream, masks, positions, the experts'
    inputs and outputs) is held in the bucket's state, so the shared memory pool never reuses it;
    rotary tables and KV-cache slots are rebuilt inside each piece (a few kernels) rather than
    shared across pieces. Capturing first runs the step on a side stream with the host-deciding
    experts left out (their output taken as zeros: they run eagerly, so they need no warm-up, and
    their caches must not count a step that is not real), then restores the cache's lengths; the
    slots written are rewritten by the real step. Logits are those of ``model(...)``.
    """

    def __init__(self, model: torch.nn.Module, cache: KVCache, bucket: int = KVCache.SLOT_BUCKET,
                 capture: bool = True, run_ahead: bool = True, run_ahead_min_kept: float = 0.5):
        reason = piecewise_support(model, need_cuda=capture)
        if reason is not None:
            raise ValueError(f"cannot run decode steps as CUDA-graph pieces: {reason}")
        self.capture = capture  # False: the same pieces run eagerly (any device; what the tests hold to model())
        self._setup(model, cache, bucket, capture)  # _graphs: bucket -> (the pieces' graphs, their state)
        self._cuts = [i for i, layer in enumerate(model.layers)
                      if hasattr(layer.mlp, "route") and type(layer.mlp.experts) is not Experts]
        # the cut layers whose experts compute the all-resident output inside the piece (fixed per model)
        self._spec = {j for j in self._cuts if hasattr(model.layers[j].mlp.experts, "speculate")
                      and model.layers[j].mlp.experts.can_speculate()}
        # the pieces k + 1 queued on layer cuts[k]'s speculation before the host reads its routing
        # (never the last piece: it advances the cache, so it must run exactly once)
        self._ahead = {k for k, j in enumerate(self._cuts[:-1])
                       if run_ahead and j in self._spec and model.layers[j].mlp.experts.can_run_ahead()}
        self._ids_host: dict = {}  # cut layer -> (pinned host buffer of its routing ids, the copy's event)
        if not 0.0 <= run_ahead_min_kept <= 1.0:
            raise ValueError(f"run_ahead_min_kept must be in [0, 1], got {run_ahead_min_kept}")
        self.run_ahead_min_kept = run_ahead_min_kept
        self._kept = {k: 1.0 for k in self._ahead}  # moving share of kept speculations (weight 1/4 on the latest)

    def _piece(self, k: int, st: dict, num_slots: int) -> None:
        """Run piece k of a step on the state ``st`` (eagerly, or inside a capture)."""
        from .layers import _rope_tables
        m, c, cuts = self.model, self.cache, self._cuts
        layers = m.layers
        _rope_tables.cos = None  # tables rebuilt in this piece, never read from another piece's memory
        if k == 0:
            B = self._ids_B1.shape[0]
            pos, mask, windowed, _ = m._positions_and_masks(B, 1, c, self._valid_B1, num_slots)
            x = m.embed(self._ids_B1)
            cos, sin = m.rotary(pos, x.dtype)
            st.update(pos=pos, mask=mask, windowed=windowed, cos=cos, sin=sin)
            first = 0
        else:
            j = cuts[k - 1]  # the rest of the MoE block whose experts ran on the host before this piece
            block = layers[j].mlp
            x = st[f"xmid{j}"] + block.combine(st[f"h{j}"], st[f"xN{j}"], st[f"y{j}"])
            first = j + 1
        last = cuts[k] if k < len(cuts) else len(layers)
        c.step_slots(st["pos"])
        try:
            for i in range(first, last):
                layer = layers[i]
                mask = layer.pick_mask(st["mask"], st["windowed"])
                x = layer(x, st["cos"], st["sin"], mask, c, num_slots, self._valid_B1)
            if k < len(cuts):
                layer = layers[last]
                mask = layer.pick_mask(st["mask"], st["windowed"])
                xmid, h = layer.attention_half(x, st["cos"], st["sin"], mask, c, num_slots)
                xN, ids, w = layer.mlp.route(h, self._valid_B1)
                # kept per layer: the experts between this piece and the next read exactly these
                st.update({f"xmid{last}": xmid, f"h{last}": h, f"xN{last}": xN, f"ids{last}": ids, f"w{last}": w})
                guess_next = getattr(layer.mlp.experts, "guess_next", None)
                guess = guess_next(xN) if guess_next is not None else None
                if guess is not None:
                    # the next layer's guess (a router, probe or recorded guess) beside the routing, both
                    # read back in one copy: no launch and no sync of its own between the pieces
                    st[f"ig{last}"] = torch.cat([ids, guess.to(ids.dtype)], dim=1)
                features = getattr(layer.mlp.experts, "lookahead_features", None)
                f = features(xN) if features is not None else None
                if f is not None:
                    # what a predictor reading point C takes beside the routing (the next layer's attention runs
                    # here, in the piece, in order: it writes that layer's KV slots, which its own attention then
                    # overwrites; an eager run between pieces would read another bucket's captured arguments)
                    st[f"lf{last}"] = f
                if last in self._spec:
                    # the experts' output if all of them are resident, into the buffer the next piece
                    # reads; the host keeps it when it finds them so (no launch of its own), else
                    # computes the layer as usual and overwrites it
                    if f"y{last}" not in st:
                        st[f"y{last}"] = torch.empty_like(xN)
                    st[f"y{last}"].copy_(layer.mlp.experts.speculate(xN, ids, w))
            else:
                st["logits"] = m.lm_head(m.norm(x))
                c.advance(self._valid_B1, 1)
        finally:
            c.step_slots(None)
            _rope_tables.cos = None

    def _before_piece(self, k: int) -> None:
        """Outside any capture, before piece k runs: the slot table of the experts it speculates
        on made current, and the stream ordered after the copies into their slots."""
        if k < len(self._cuts) and self._cuts[k] in self._spec:
            self.model.layers[self._cuts[k]].mlp.experts.prepare_speculation()

    def _experts(self, k: int, st: dict, dry: bool, ids_host: np.ndarray | None = None) -> bool:
        """Between piece k and k+1: the host-deciding experts of layer cuts[k], into its buffer.
        True when the buffer already held their output (the speculation was kept)."""
        j = self._cuts[k]
        if f"y{j}" not in st:
            st[f"y{j}"] = torch.zeros_like(st[f"xN{j}"])
        if dry:
            return False
        experts = self.model.layers[j].mlp.experts
        args = (st[f"xN{j}"], st[f"ids{j}"], st[f"w{j}"])
        kw = {}
        both = st.get(f"ig{j}")
        if both is not None:  # the routing and the next layer's guess, read back together
            both = both.cpu().numpy()
            K = st[f"ids{j}"].shape[1]
            kw = dict(ids_host=both[:, :K] if ids_host is None else ids_host, guess_host=both[:, K:])
        elif ids_host is not None:
            kw = dict(ids_host=ids_host)
        if f"lf{j}" in st:  # a predictor reading point C: its features, computed in the piece
            kw["features"] = st[f"lf{j}"]
        if j in self._spec:
            y = experts(*args, speculated=st[f"y{j}"], **kw)
        else:
            y = experts(*args, **kw)
        if y is st[f"y{j}"]:
            return True
        st[f"y{j}"].copy_(y)
        return False

    def _ids_to_host(self, j: int, st: dict) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Layer j's routing ids on the host, waiting only for the work queued so far (a copy into
        pinned memory and its event), not for what is queued after this call."""
        ids = st[f"ids{j}"]
        buf, ev = self._ids_host.get(j, (None, None))
        if buf is None or buf.shape != ids.shape or buf.dtype != ids.dtype:
            buf = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=ids.is_cuda)
            ev = torch.cuda.Event() if ids.is_cuda else None
            self._ids_host[j] = (buf, ev)
        buf.copy_(ids, non_blocking=ids.is_cuda)
        if ev is not None:
            ev.record()
        return buf, ev

    def _capture(self, num_slots: int) -> tuple[list[torch.cuda.CUDAGraph], dict]:
        c = self.cache
        lengths = c.lengths.clone()
        n = len(self._cuts) + 1
        try:
            side = torch.cuda.Stream(c.device)
            side.wait_stream(torch.cuda.current_stream(c.device))
            with torch.cuda.stream(side):  # compile kernels and create handles outside the capture
                warm: dict = {}
                for k in range(n):
                    self._piece(k, warm, num_slots)
                    if k < n - 1:
                        self._experts(k, warm, dry=True)
                c.lengths.copy_(lengths)
            torch.cuda.current_stream(c.device).wait_stream(side)
            del warm
            st: dict = {}
            graphs = []
            for k in range(n):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
                    self._piece(k, st, num_slots)
                graphs.append(g)
                if k < n - 1:
                    self._experts(k, st, dry=True)  # allocates the buffer the next piece reads
            return graphs, st
        finally:
            c.lengths.copy_(lengths)

    @torch.inference_mode()
    def step(self, input_B1: torch.Tensor, valid_B1: torch.Tensor, max_length: int) -> torch.Tensor:
        """Logits [B, 1, V] of one decode step; advances the cache like ``model(...)`` would."""
        num_slots = self._inputs(input_B1, valid_B1, max_length)
        if self.capture:
            graphs, st = self._captured(num_slots)

            def run(k):
                self._before_piece(k)
                graphs[k].replay()
        else:
            st = {}

            def run(k):
                self._before_piece(k)
                self._piece(k, st, num_slots)
        run(0)
        for k in range(len(self._cuts)):
            if k in self._ahead and self._kept[k] >= self.run_ahead_min_kept:
                # run-ahead: piece k + 1 is queued on layer cuts[k]'s speculation before the host
                # looks at that layer's routing, so the host's work for the layer overlaps the
                # GPU's next piece instead of leaving the GPU idle. When the speculation is not
                # kept, piece k + 1 runs again on the real output: it rewrites the same KV slots
                # and buffers, and its own speculation is prepared afresh.
                buf, ev = self._ids_to_host(self._cuts[k], st)
                run(k + 1)
                if ev is not None:
                    ev.synchronize()
                kept = self._experts(k, st, dry=False, ids_host=buf.numpy().copy())
                if not kept:
                    run(k + 1)
            else:
                kept = self._experts(k, st, dry=False)
                run(k + 1)
            if k in self._ahead:
                self._kept[k] += 0.25 * (float(kept) - self._kept[k])
        return st["logits"]
