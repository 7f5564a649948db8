"""The generation engine: continuous batching over a per-row KV cache.

Shape legend: B = cache rows (max_batch_size), T = tokens fed this step, V = vocabulary,
R = running requests sampled this step.

Each running request owns one row of a ``KVCache`` (``model.new_cache(B, max_len)``). One
``step()`` is one model forward over all B rows:

    admit waiting requests into free rows (cache.reset(rows))
    input_BT: a new row carries its prompt (or its next chunk: at most ``prefill_chunk`` prompt
              tokens a step in all, fed first come first served), a running row its last sampled
              token, a free row nothing; valid_BT marks the real tokens (right padding)
    logits_BTV = model(input_BT, cache, valid_BT)     # the model advances each row by its valid count
    sample one token per row that is decoding or has just fed its prompt's last token, from the
    logits of its last valid token (a row part-way through its prompt samples nothing)
    stop checks; finished rows are freed and can be taken by a waiting request next step

A model may also offer ``greedy_next(input_BT, cache, valid_BT) -> [B]`` (each row's argmax token of
the step, as the sampler would take it): when every running request is greedy the engine calls it
instead of fetching logits. Expert-parallel serving (serve/ep_model.py) does, so rank 0 sends token
ids back through Ray instead of a vocabulary's logits per row.

Packed steps: where the model takes ``segments`` (``MoEForCausalLM.forward``, a plain KVCache) and
the rows feed different counts (a prompt beside decoding rows), the step need not be padded to [B, T]:
the fed tokens go one after another as [1, N], one part per run of rows feeding the same count
(``moe.kv_cache.PackedStep``), so a 2048-token prompt joining 7 decoding rows is 2055 tokens of
attention, norms and projections, not 8 x 2048. Where the model attends over the whole packed step in one
launch (``MoEForCausalLM.packs_in_one_pass``: grouped-query attention on CUDA, ``kernels.packed_attention``)
every mixed step packs, and so does every step of several tokens a row (a lone prompt: one part), since torch's
SDPA plans a cuDNN graph for each new length it meets (37 ms to 0.95 s once); where it attends part by part, each
part costs host time a layer, so a step packs where it saves enough padding (``Engine._pays_to_pack``) or where the
padded step would pass what the prefill chunk bounds. Eager steps of one count run rows 0 .. the last running one
([1, T] for a lone prompt).

So prefill of newcomers and decoding of the others share one forward, and requests join and
leave at every step. Chunked prefill (``prefill_chunk``): a step feeds at most that many prompt
tokens in all, first come first served (a prompt the budget does not reach waits; vLLM's token
budget), so a prompt longer than the chunk is fed over several steps, one step's tokens stay near
prefill_chunk + B (packed; [B, prefill_chunk] padded, for a model without packed steps) whatever
the prompts (the activations, and the attention mask's [rows, 1, T, S], grow with T: a 32k-token
prompt in one step needs a 2 GiB mask per row in bf16), and the decoding rows keep producing a
token every step meanwhile. The cache row holds the fed tokens, and each chunk attends to them as
the whole prompt would (same logits up to the order of floating-point sums). Rows never see each other: attention is per row and the MoE layers are per
token, so a request's greedy output does not depend on its batch-mates (tested).

Lengths: a sequence (prompt + generated tokens) holds at most ``max_len`` tokens; a request
that reaches it finishes with reason ``"length"``, as one that reaches ``max_new_tokens`` does.
Finish reasons: ``"stop"`` (an end-of-sequence id, a stop token id or a stop string),
``"length"``, ``"abort"``. Stop strings are trimmed from the text; a stop token id is part of
``new_token_ids`` but its text is not emitted. While a stop string could still be forming at
the end of the text, that tail is held back, so streamed text never shows part of a stop string.
"""
from __future__ import annotations

import inspect
import itertools
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .cuda_graph import DecodeGraphs, GraphCaptureError, PiecewiseDecodeGraphs, graph_support, piecewise_support
from .kv_cache import KVCache
from .sampling import SamplingParams, sample_tokens
from .tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    text: str = ""          # decoded output so far (before stop-string trimming)
    emitted: int = 0        # characters of ``text`` already returned
    row: int | None = None
    prefilled: bool = False
    cached: int = 0         # tokens of this request in its cache row (host-side copy of cache.lengths)
    admitted: int = 0       # admission order: prompts are fed first come, first served within a step's budget


def _hooked(model: torch.nn.Module) -> str | None:
    """A reason not to capture: forward hooks (trace recorders, routing overrides) run host code."""
    if not hasattr(model, "named_modules"):  # a model object that is not an nn.Module has no hooks
        return None
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"module {name or type(model).__name__} has forward hooks (they run host code every step)"
    return None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def warm_up_token_counts(lo: int, hi: int, top_k: int | None = None) -> list[int]:
    """The step token counts in [lo, hi] Engine.warm_up runs: 2^k and 2^k + 1, and with a top-k that is not a power
    of two also cdiv(2^k, top_k) and that + 1. The experts' kernels change launch constants (their config, the token
    alignment's) where the token count or the routed pairs (tokens x top-k) pass a power of two, so a step of each
    such count meets every variant a step of tokens in [lo, hi] can (tested against kernels' own dispatch for the
    published shapes)."""
    out = set()
    for k in range(max(hi, 1).bit_length() + (top_k or 1).bit_length() + 1):  # (pairs reach hi x top-k)
        out.update((2 ** k, 2 ** k + 1))
        if top_k and top_k > 1 and top_k & (top_k - 1):
            out.update((-(-2 ** k // top_k), -(-2 ** k // top_k) + 1))
    return sorted(n for n in out if lo <= n <= hi)


# padded tokens a packed step must save per part beyond its first (Engine._pays_to_pack), by the device's kind: on the
# H200 a part costs ~0.3-0.6 ms a layer of host time against ~0.3 us a padded token and layer (s32-j, s32-k); on a
# CPU padding costs far more (the dev machine, the tiny model: a 256-token prompt beside 7 decoding rows 20 ms packed
# against 36 padded, four 40-70-token prompts beside 4 rows 26 against 21)
PACK_TOKENS_PER_PART = {"cuda": 2048, "cpu": 256}
# the same where the model attends over a packed step in one launch (MoEForCausalLM.packs_in_one_pass: grouped-query
# attention on CUDA, kernels.packed_attention): a part then costs no launch of its own, and the step a little host
# work (its token table, three small copies). On the H200 (s33-b, 8 rows, 4 layers) the one-launch step was the faster
# in every case that saves >= 84 padded tokens a part (a 2048-token prompt beside 7 decoding rows: Qwen3 5.43 ms
# against 17.94 padded and 6.67 part by part), 0.1-0.4 ms slower where it saved 15-22. But a padded mixed step of a
# shape not met before took 50-80 ms once (s33-d, a fresh replica's staggered requests: the longest step 82 ms with
# 64 here, 12 ms with 0; mean TTFT 53 against 19.5 ms; not profiled, a guess: cuDNN planning attention for a new
# [rows, T]), where a packed step's kernels have no per-shape plans. So every mixed step packs, and so does every
# other step of more than one token a row (s34-h confirmed the guess: torch's SDPA, cuDNN on the H200, took 37-40 ms
# the first time it met each length, causal, and 38-955 ms with a mask, then 0.06-1.3 ms)
PACK_TOKENS_ONE_PASS = 0


class Engine:
    """Continuous-batching generation over one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, max_batch_size: int = 8,
                 max_len: int = 2048, cuda_graph: bool | None = None, prefill_chunk: int | None = None):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"Engine max_batch_size={max_batch_size!r} must be an int >= 1")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"Engine prefill_chunk={prefill_chunk!r} must be an int >= 1 (prompt tokens a step "
                             "feeds, across its rows) or None (whole prompts in one step)")
        self.prefill_chunk = prefill_chunk
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"Engine max_len={max_len!r} must be an int >= 2 (prompt plus at least one token)")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_len = max_len
        # the model's own device (its embedding's) when it says; offloading may leave experts elsewhere
        device = getattr(model, "device", None)
        if not isinstance(device, torch.device):
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = device
        self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        self.cache = model.new_cache(max_batch_size, max_len)
        try:  # optional in the model contract: logits of each row's last valid token only
            self._last_only = "last_only" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self._last_only = False
        self._greedy_next = getattr(model, "greedy_next", None)  # optional: see the module docstring
        # a mixed step packs when it saves this many padded tokens per extra part (_pays_to_pack; 0: always)
        self.pack_tokens_per_part = PACK_TOKENS_PER_PART.get(self.device.type, PACK_TOKENS_PER_PART["cuda"])
        try:  # optional too: packed steps (forward(segments=...), moe.kv_cache.PackedStep) on a plain KVCache
            self._packed = (self._last_only and self._greedy_next is None and type(self.cache) is KVCache
                            and "segments" in inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            self._packed = False
        one_pass = getattr(model, "packs_in_one_pass", None)
        self._one_pass = False  # the model attends over a packed step in one launch: every multi-token step packs
        if self._packed and one_pass is not None:
            with torch.no_grad():  # (the steps run without autograd)
                if one_pass(self.cache):
                    self.pack_tokens_per_part = PACK_TOKENS_ONE_PASS
                    self._one_pass = True
        # decode steps (every running row feeds one token) replay CUDA graphs where the model allows
        # (moe.cuda_graph): None = when supported, True = required, False = never
        self._graphs = None
        if cuda_graph is not False:
            hooked = _hooked(model)
            reason = graph_support(model) or hooked
            if reason is None:
                self._graphs = DecodeGraphs(model, self.cache)
            elif hooked is None and piecewise_support(model) is None:
                # experts that decide on the host (offloaded): graph pieces around them
                self._graphs = PiecewiseDecodeGraphs(model, self.cache)
            elif cuda_graph:
                raise ValueError(f"cuda_graph=True but decode steps cannot be captured: {reason}")
        self._ids = itertools.count()
        self._admissions = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Request | None] = [None] * max_batch_size
        self._aborted: list[RequestOutput] = []

    def warm_up(self, rows: int | None = None, max_prompt: int | None = None) -> int:
        """Throwaway requests through the kinds of step the engine takes, before any real one, so that on a GPU
        every Triton kernel compiles (seconds each in a machine's first process) and every decode graph captures
        here instead of inside the first requests' latency (a serving replica calls this when it loads):

        - prompts of 1, then 2^k and 2^k + 1 tokens up to ``max_prompt`` (default max_len - 2; a replica passes its
          longest allowed prompt; with ``prefill_chunk``, up to the chunk and one of two chunks and a token, since a
          longer one only repeats the chunk's steps), one row each, prefilled and decoded one step: a prefill runs
          [1, T] tokens (T at most ``prefill_chunk``), the expert kernels' launch configs change with the token count
          (kernels/launch_config.py), and Triton specialises an integer argument on whether it is 1 and whether
          16 divides it, so each such variant meets its first call here;
        - without ``prefill_chunk``, prompts arriving together whose tokens make one step of 2^k and 2^k + 1 tokens
          past the longest prompt, up to ``rows`` of them: the same variants for steps of several prompts;
        - ``rows`` (default max_batch_size) prompts of that longest length at once, one of them sampled
          (temperature, top-p, top-k), the others greedy: the largest prefill a burst of requests can make
          (with ``prefill_chunk``, the chunk fed first come first served beside rows that wait or decode), so
          a budget that cannot run it fails here, at load, with what to lower (not a replica mid-traffic), and
          the allocator holds its blocks before the first request; then a decode step of every row, both token
          paths;
        - ``rows`` requests arriving one a step (prompts of 2 and of the longest length in turn) while the earlier
          ones decode: packed steps of a prompt beside 1 .. rows - 1 decoding rows, as traffic makes them; then one
          step packed whatever it saves (a model that attends over a packed step in one launch has kernels there),
          its slots cut as a long context's are and its longer prompt in the wide table
          (``kernels.packed_attention.every_variant``);
        - every decode slot bucket up to max_len captured (``capture_all``; the first 64).

        Before session 27 one short prompt ran (1 row, then rows): a fresh replica's first 64-token prompts still
        took 2.5 s to their first token (BENCHMARKS 8d). A warm-up request that fails raises RuntimeError naming
        it. The engine is left idle, its request ids unused by the warm-up ('warm-...' ids), the model's offload
        statistics reset (its ``offload_cache`` and ``cpu_tier``). Returns the steps it ran."""
        if self.has_unfinished():
            raise RuntimeError("warm_up needs an idle engine: it runs before the first request")
        rows = self.max_batch_size if rows is None else max(1, min(int(rows), self.max_batch_size))
        top = self.max_len - 2 if max_prompt is None else max(1, min(int(max_prompt), self.max_len - 2))
        text = self.tokenizer.encode("def warm_up(x):\n    return [x * 2 for _ in range(3)]\n") or [0]
        steps = 0

        def run(requests, one_a_step=False):
            nonlocal steps
            pending = list(requests)
            while pending or self.has_unfinished():
                for rid, prompt, params in pending[:1] if one_a_step else pending:
                    self.add_request(prompt, params, request_id=rid)
                pending = pending[1:] if one_a_step else []
                self.step()
                steps += 1

        top_k = getattr(getattr(self.model, "config", None), "num_experts_per_tok", None)
        lengths = warm_up_token_counts(1, top, top_k)
        if top not in lengths:
            lengths.append(top)
        if self.prefill_chunk is not None and self.prefill_chunk < top:
            # a longer prompt only repeats the chunk's own steps (T = chunk, then its remainder) on a longer cache:
            # one prompt of two chunks and a token covers that (the burst below still reaches the longest prompt)
            lengths = [n for n in lengths if n <= self.prefill_chunk] + [min(top, 2 * self.prefill_chunk + 1)]

        def prompt_of(n):
            return (text * (n // len(text) + 1))[:n]

        def failed(what, e):  # a real request (or burst) like it would fail the same way, mid-traffic
            return RuntimeError(
                f"Engine.warm_up: {what} failed ({type(e).__name__}: {e}); requests like it would fail the same "
                f"way. Allow shorter prompts (warm_up's max_prompt, a replica's max_prompt_tokens: {top} now) or a "
                f"smaller max_batch_size ({self.max_batch_size}: a prefill runs [rows, prompt] at once) or "
                f"prefill_chunk ({self.prefill_chunk}: prompt tokens a step feeds), or give the model "
                "more memory")

        for n in lengths:
            try:
                run([(f"warm-len{n}", prompt_of(n), SamplingParams(max_new_tokens=2, ignore_eos=True))])
            except Exception as e:
                raise failed(f"a prompt of {n} tokens", e) from e
        # steps of more tokens than one prompt holds: prompts arriving together, packed into one step of 2^k and
        # 2^k + 1 tokens up to what rows prompts make (without a chunk; with one, no step passes chunk + rows). A
        # fresh replica's first 64-token prompts arriving two and four at once (129-263 tokens a step) compiled the
        # experts' alignment for those counts inside their latency (s32-g)
        if self.prefill_chunk is None and rows > 1:
            for n in warm_up_token_counts(top + 1, rows * top, top_k):
                sizes = [top] * (-(-n // top) - 1)
                sizes.append(n - sum(sizes))
                try:
                    run([(f"warm-sum{n}-{i}", prompt_of(m), SamplingParams(max_new_tokens=2, ignore_eos=True))
                         for i, m in enumerate(sizes)])
                except Exception as e:
                    raise failed(f"{len(sizes)} prompts of {n} tokens in all", e) from e
        # the worst case a burst of requests can make: every row's prompt the longest allowed, in one prefill
        greedy = SamplingParams(max_new_tokens=2, ignore_eos=True)
        sampled = SamplingParams(max_new_tokens=2, ignore_eos=True, temperature=0.8, top_p=0.9, top_k=20, seed=0)
        try:
            run([(f"warm-batch-{i}", prompt_of(top), sampled if i == rows - 1 else greedy) for i in range(rows)])
        except Exception as e:
            raise failed(f"a batch of {rows} prompts of {top} tokens", e) from e
        # traffic: requests arriving one a step while the earlier ones decode, so prompts join 1 .. rows - 1
        # decoding rows (packed steps: their one-token parts run kernels, e.g. the fused q/k/v projection of several
        # rows, that no step above runs eagerly; a fresh replica's first such requests compiled it, s32-e)
        joins = [(f"warm-join-{i}", prompt_of(top if i % 2 else 2), SamplingParams(max_new_tokens=rows + 1,
                                                                                    ignore_eos=True))
                 for i in range(rows)]
        try:
            run(joins, one_a_step=True)
        except Exception as e:
            raise failed(f"prompts of 2 and {top} tokens joining decoding rows", e) from e
        # a packed step, whatever it saves: the joins above pack only where that pays (_pays_to_pack), which short
        # prompts may not reach, and a model that attends over a packed step in one launch has kernels of its own
        # there (kernels.packed_attention, the q/k/v preparation by row) that a fresh replica's first packed step
        # compiled otherwise (s33-b)
        if self._packed and rows > 1:
            from kernels.packed_attention import every_variant
            saved, self.pack_tokens_per_part = self.pack_tokens_per_part, 0
            try:
                # with every block's slots cut in pieces, the decoding row in the one-token table and a prompt of 3
                # tokens in the wide table, as a long context's step and a long prompt have them: merges, one-token
                # and wide tiles compile here, not in a request at 1024 / 16384 slots or a prompt of thousands
                with every_variant():
                    run([(f"warm-packed-{i}", prompt_of(min(2 + i, top)), SamplingParams(max_new_tokens=3,
                                                                                          ignore_eos=True))
                         for i in range(2)], one_a_step=True)
            except Exception as e:
                raise failed("a prompt of 2 tokens joining a decoding row, packed", e) from e
            finally:
                self.pack_tokens_per_part = saved
        if self._graphs is not None:
            self._graphs.capture_all()
        for name in ("offload_cache", "cpu_tier"):  # (offload.apply_offload's cache, apply_cpu_tier's runtime)
            part = getattr(self.model, name, None)
            if callable(getattr(part, "reset_stats", None)):
                part.reset_stats()
        return steps

    @property
    def captured_graphs(self) -> list[int]:
        """The decode slot buckets captured as CUDA graphs so far (empty when steps run eagerly)."""
        return self._graphs.captured if self._graphs is not None else []

    # --- requests ----------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a prompt (text, or token ids); it joins the running batch at the next step."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty (no tokens); give at least one token of text")
        if len(ids) >= self.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but max_len is {self.max_len}: a sequence must "
                             "fit its prompt and at least one new token; shorten the prompt or raise max_len")
        if self.vocab_size is not None and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"prompt token id {bad} is outside the model's vocabulary (size {self.vocab_size}); "
                             "encode the prompt with this model's tokenizer")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if any(r is not None and r.request_id == rid for r in self._rows) or \
                any(r.request_id == rid for r in self._waiting):
            raise ValueError(f"request id {rid!r} is already in use; pick a unique id or pass none")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.tokenizer.eos_token_ids)
        req = _Request(rid, ids, params, frozenset(stop_ids), params.make_generator(self.device),
                       self.tokenizer.detokenizer(ids))
        self._waiting.append(req)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its final output (reason "abort") comes with the next step.
        Returns False when no unfinished request has that id."""
        for i, r in enumerate(self._waiting):
            if r.request_id == request_id:
                del self._waiting[i]
                self._aborted.append(RequestOutput(request_id, [], "", True, "abort"))
                return True
        for row, r in enumerate(self._rows):
            if r is not None and r.request_id == request_id:
                self._free(r)
                self._aborted.append(RequestOutput(request_id, [], "", True, "abort"))
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._rows) or bool(self._aborted)

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._rows)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # --- one step ----------------------------------------------------------------------------
    def _admit(self) -> None:
        """Move waiting requests into free rows, first come first served.

        A newcomer's prompt (checked < max_len at add_request) fits in its own empty row, and
        the cache only needs room for each row's valid tokens, so a free row is filled at once,
        however long the running rows are: rows that finish at different steps (staggered
        arrivals) never leave a row idle while requests wait.
        """
        free = [b for b, r in enumerate(self._rows) if r is None]
        new_rows = []
        for b in free:
            if not self._waiting:
                break
            req = self._waiting.popleft()
            req.row, req.admitted = b, next(self._admissions)
            self._rows[b] = req
            new_rows.append(b)
        if new_rows:
            self.cache.reset(new_rows)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit waiting requests, run one forward over the batch, sample, apply stop rules."""
        outputs, self._aborted = self._aborted, []
        self._admit()
        running = [r for r in self._rows if r is not None]
        if not running:
            return outputs
        feeds = self._feeds(running)
        # rows that sample this step: decoding, or feeding their prompt's last token
        sampling = [r for r in running if r.row in feeds and (
            r.prefilled or r.cached + len(feeds[r.row]) == len(r.prompt_ids))]
        T = max(len(f) for f in feeds.values())
        B = self.max_batch_size
        cache = self.cache
        segments = None
        if T > 1 and type(cache) is KVCache:  # (a subclass may record what it is given: left whole)
            # an eager step runs the rows up to the last running one, not every row of the cache: rows are taken
            # lowest first, so a lone request's prefill is [1, T], not [B, T] of padding (attention, norms and
            # projections run every padded token); rows feeding different counts pack where that pays
            B = max(feeds) + 1
            cache = cache.rows_prefix(B)
            if self._packed:
                segments = self._segments(feeds, B)
                if segments is None and self._one_pass:
                    # rows all feeding T tokens (a lone prompt's prefill): one part, so that attention runs in the
                    # packed kernel, not torch's SDPA, whose cuDNN backend plans a graph for every new length it
                    # meets: 37-40 ms the first time, up to 0.95 s with the padded step's mask (H200, s34-h), inside
                    # the latency of every request whose prompt length the replica had not seen
                    segments = [(B, T)]
                if segments is not None and not self._pays_to_pack(segments, B, T):
                    segments = None
        if segments is not None:
            # rows feeding different counts (a prompt's chunk beside decoding rows): packed, each run of rows
            # feeding the same count one part, so the step computes sum(fed) tokens (idle rows one), not B x T
            ids, valid = [], []
            for b, t in enumerate(t for n, t in segments for _ in range(n)):
                f = feeds.get(b, [0])
                ids += f + [0] * (t - len(f))
                valid += [b in feeds] * len(f) + [False] * (t - len(f))
            ids, valid = [ids], [valid]
        else:
            # the batch built as lists and made a tensor once (a tensor per row cost ~5 us a row)
            ids, valid = [[0] * T for _ in range(B)], [[False] * T for _ in range(B)]
            for b, f in feeds.items():
                ids[b][:len(f)] = f
                valid[b][:len(f)] = [True] * len(f)
        input_BT = torch.tensor(ids, dtype=torch.long).to(self.device)
        valid_BT = torch.tensor(valid, dtype=torch.bool).to(self.device)
        rows = torch.tensor([r.row for r in sampling], dtype=torch.long, device=self.device)
        # a pure decode step replays a CUDA graph where one is available; else the model runs eagerly
        logits_RV = self._graph_step(input_BT, valid_BT, rows, running) if T == 1 else None
        tokens = None
        if segments is not None:  # (a packed model takes last_only and has no greedy_next)
            logits_RV = self.model(input_BT, cache=self.cache, valid_BT=valid_BT, last_only=True,
                                   segments=segments)[rows, 0]
        elif logits_RV is None and self._greedy_next is not None and all(r.params.greedy for r in sampling):
            tokens = self._greedy_next(input_BT, cache, valid_BT)[rows].tolist()
        elif logits_RV is None and self._last_only:
            # the model projects only each row's last valid token onto the vocabulary
            logits_RV = self.model(input_BT, cache=cache, valid_BT=valid_BT, last_only=True)[rows, 0]
        elif logits_RV is None:
            logits_BTV = self.model(input_BT, cache=cache, valid_BT=valid_BT)
            last = torch.tensor([len(feeds[r.row]) - 1 for r in sampling], dtype=torch.long, device=self.device)
            logits_RV = logits_BTV[rows, last]
        if tokens is None:
            tokens = sample_tokens(logits_RV, [r.params for r in sampling], [r.generator for r in sampling]) \
                if sampling else []
        for req in running:
            req.cached += len(feeds.get(req.row, ()))
        for req, tok in zip(sampling, tokens):
            req.prefilled = True
            outputs.append(self._advance(req, tok))
        return outputs

    def _pays_to_pack(self, segments: list[tuple[int, int]], B: int, T: int) -> bool:
        """Whether a step of rows feeding different counts runs packed, not padded to [B, T].

        Where the model attends over a packed step in one launch, always (PACK_TOKENS_ONE_PASS). Else attention
        runs part by part, each part a few more launches a layer on the host (~0.3-0.6 ms a
        part and layer at Qwen3-30B-A3B widths on the H200 machine: cuDNN attention, projections, q/k/v
        preparation); padded, every padded token costs projections, norms and attention on the GPU (~0.3 us a token
        and layer there). So a step packs when it saves at least ``pack_tokens_per_part`` padded tokens per part
        beyond the first (PACK_TOKENS_PER_PART by device kind; s32-j, s32-k: a 2048-token prompt beside 7 decoding
        rows 2.6x faster packed, four prompts of 200-500 tokens beside 4 decoding rows 2.1x slower), and always
        where the padded step would pass the tokens a prefill chunk was chosen to bound (``prefill_chunk`` + B - 1,
        ``offload.step_activation_bytes``)."""
        padded = B * T
        packed = sum(n * t for n, t in segments)
        if self.prefill_chunk is not None and padded > self.prefill_chunk + B - 1:
            return True
        return padded - packed >= self.pack_tokens_per_part * (len(segments) - 1)

    @staticmethod
    def _segments(feeds: dict[int, list[int]], B: int) -> list[tuple[int, int]] | None:
        """A packed step's parts over rows 0 .. B-1 (runs of rows feeding the same count; an idle row feeds one
        padding token), or None where every row feeds the same count (the plain [B, T] step is that)."""
        counts = [len(feeds[b]) if b in feeds else 1 for b in range(B)]
        parts: list[list[int]] = []
        for t in counts:
            if parts and parts[-1][1] == t:
                parts[-1][0] += 1
            else:
                parts.append([1, t])
        return [(n, t) for n, t in parts] if len(parts) > 1 else None

    def _feeds(self, running: list[_Request]) -> dict[int, list[int]]:
        """The tokens each row feeds this step: a decoding row its last token; rows in their prompt the rest of
        it, first come first served, at most ``prefill_chunk`` prompt tokens in all (a row the budget does not reach
        feeds nothing this step and waits)."""
        feeds, budget = {}, self.prefill_chunk
        for r in sorted(running, key=lambda r: r.admitted):
            if r.prefilled:
                feeds[r.row] = r.output_ids[-1:]
            elif budget is None:
                feeds[r.row] = r.prompt_ids[r.cached:]
            elif budget > 0:
                feeds[r.row] = r.prompt_ids[r.cached:r.cached + budget]
                budget -= len(feeds[r.row])
        return feeds

    def _graph_step(self, input_BT, valid_BT, rows, running) -> torch.Tensor | None:
        """Logits [R, V] of a pure decode step replayed from a CUDA graph, or None to run it eagerly."""
        if self._graphs is None or not all(r.prefilled for r in running):
            return None
        try:
            return self._graphs.step(input_BT, valid_BT, max(r.cached for r in running))[rows, 0]
        except GraphCaptureError as e:  # the cache is untouched: decode eagerly from now on
            warnings.warn(f"decoding without CUDA graphs from now on: {e}", RuntimeWarning, stacklevel=3)
            self._graphs = None
            return None

    def _free(self, req: _Request) -> None:
        # an emptied row has length 0, so it never limits what the other rows may be fed
        self._rows[req.row] = None
        self.cache.reset([req.row])

    def _advance(self, req: _Request, token: int) -> RequestOutput:
        """Record one sampled token; decide whether the request is finished; free its row if so."""
        req.output_ids.append(token)
        p = req.params
        reason = None
        stop_at = None  # where a stop string starts in req.text
        if token in req.stop_ids:
            reason = "stop"  # the stop token's own text is never shown
        else:
            req.text += req.detok.push(token)
            if p.stop:
                # a stop string can only have appeared in text that arrived since the last check
                start = max(0, req.emitted - max(len(s) for s in p.stop) + 1)
                hits = [i for i in (req.text.find(s, start) for s in p.stop) if i >= 0]
                if hits:
                    reason, stop_at = "stop", min(hits)
        if reason is None and (len(req.output_ids) >= p.max_new_tokens
                               or len(req.prompt_ids) + len(req.output_ids) >= self.max_len):
            reason = "length"
        if reason is None:
            # hold back a tail that could still grow into a stop string
            end = len(req.text) - (_held_back(req.text, p.stop) if p.stop else 0)
        elif stop_at is not None:
            end = stop_at
        else:
            # finished without a stop string: an unfinished character is flushed as it decodes
            req.text += req.detok.flush()
            end = len(req.text)
        new_text = req.text[req.emitted:end] if end > req.emitted else ""
        req.emitted = max(req.emitted, end)
        if reason is not None:
            self._free(req)
        return RequestOutput(req.request_id, [token], new_text, reason is not None, reason)


def prefill_chunk_setting(value) -> int | str | None:
    """A prefill-chunk setting as `moe generate` / `moe serve` take it: 'auto' (kept for offload.auto_prefill_chunk
    to decide), 'off' or None (whole prompts), or a token count >= 1 (an int, or its text)."""
    if value is None or value in ("auto", "off"):
        return None if value in (None, "off") else value
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"prefill_chunk ({value!r}) must be a token count >= 1, 'auto' or 'off'")
    return value


def _max_len_for(tok: Tokenizer, prompts: Sequence[str | Sequence[int]], params: Sequence[SamplingParams]) -> int:
    need = 0
    for prompt, p in zip(prompts, params):
        n = len(tok.encode(prompt)) if isinstance(prompt, str) else len(prompt)
        need = max(need, n + p.max_new_tokens)
    return max(need, 2)


def _params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{n} prompts but {len(params)} SamplingParams; pass one, or one per prompt")
    return params


def generate(model: torch.nn.Module, tok: Tokenizer, prompts: Sequence[str | Sequence[int]] | str,
             params: SamplingParams | Sequence[SamplingParams] | None = None, max_batch_size: int = 8,
             max_len: int | None = None, prefill_chunk: int | None = None) -> list[str]:
    """Generated text for each prompt (continuous batching, at most ``max_batch_size`` at once).
    ``max_len`` defaults to the longest prompt plus its max_new_tokens; ``prefill_chunk`` as ``Engine``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    # encoded once here: the ids size the cache and are what the engine runs
    prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    plist = _params_list(params, len(prompts))
    engine = Engine(model, tok, max_batch_size=max(1, min(max_batch_size, len(prompts))),
                    max_len=max_len if max_len is not None else _max_len_for(tok, prompts, plist),
                    prefill_chunk=prefill_chunk)
    ids = [engine.add_request(pr, p) for pr, p in zip(prompts, plist)]
    texts = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id].append(out.new_text)
    return ["".join(texts[rid]) for rid in ids]


def stream(model: torch.nn.Module, tok: Tokenizer, prompt: str | Sequence[int],
           params: SamplingParams | None = None, max_len: int | None = None) -> Iterator[str]:
    """Yield the text of one prompt's continuation as it is generated (non-empty deltas).
    ``stream_outputs`` gives the full RequestOutputs (token ids, finish reason) instead."""
    for out in stream_outputs(model, tok, prompt, params, max_len):
        if out.new_text:
            yield out.new_text


def stream_outputs(model: torch.nn.Module, tok: Tokenizer, prompt: str | Sequence[int],
                   params: SamplingParams | None = None, max_len: int | None = None,
                   cuda_graph: bool | None = None, prefill_chunk: int | None = None) -> Iterator[RequestOutput]:
    """Every RequestOutput of one prompt, in order (the last one has ``finished=True``).
    ``cuda_graph``, ``prefill_chunk``: as ``Engine`` (None = replay decode steps from CUDA graphs where
    supported; the whole prompt in one step)."""
    params = params if params is not None else SamplingParams()
    prompt = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
    engine = Engine(model, tok, max_batch_size=1,
                    max_len=max_len if max_len is not None else _max_len_for(tok, [prompt], [params]),
                    cuda_graph=cuda_graph, prefill_chunk=prefill_chunk)
    engine.add_request(prompt, params)
    while engine.has_unfinished():
        yield from engine.step()


__all__ = ["Engine", "RequestOutput", "generate", "stream", "stream_outputs"]
