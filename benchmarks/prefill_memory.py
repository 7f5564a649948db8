"""A prefill's activation memory, and chunked prefill under offloading, on one GPU.

    python benchmarks/prefill_memory.py --out $OUT --peers transformers   # H200: four published shapes, two layers
    python benchmarks/prefill_memory.py --models tiny --device cpu        # a check of the script (the bound only)
    python benchmarks/prefill_memory.py --engine-models mixtral,qwen3 --offload-models "" --models ""  # engine rows
    python benchmarks/prefill_memory.py --models "" --offload-models "" --offload-engine-models mixtral,qwen3

Resident rows, per (model, rows B, cached tokens L, new tokens T): the peak device memory of one forward
(``last_only``, the cache at length L) above the weights and the KV cache, from torch.cuda.max_memory_allocated,
beside ``offload.prefill_activation_bytes`` (the bound ``--prefill-chunk auto`` chooses its chunk from; "x" =
bound / measured, >= 1 where it holds). Peer (``--peers transformers``): Hugging Face transformers' own model of
the same family and shape (random weights, bf16, sdpa attention), one forward of B x T tokens from an empty
DynamicCache, its peak measured the same way (L = 0 rows only).

Offloaded rows (``--offload-tokens P``): the same layers under ``apply_offload`` (device driver, a quarter of each
layer's experts cached); a prompt of P tokens prefilled whole, then in chunks of each ``--chunks`` C, through one
cache: time and peak. Floor = every uncached expert copied once: layers x (experts - slots) x expert bytes / the
copy rate measured in the same run (a 256 MiB pinned host -> device copy), the same for every chunk size: a chunk
fetches again the experts it uses that the cache no longer holds, which is what chunking costs ("x floor").
Prompt tokens are random ids (the routing of random weights).

Engine rows (``--engine-rows R``, with ``--engine-models``): one request alone on an Engine of R rows, its prompt of
``--engine-tokens`` tokens prefilled in one step (``Engine.step``), timed and its peak measured: as the engine runs
it (rows 0 .. the last running one, ``KVCache.rows_prefix``) and with every row of the cache, as before session 31
("all rows"). Then the same prompt joining R - 1 rows that decode (the step that feeds it and their next token):
packed (``Engine`` since session 32: one part per run of rows feeding the same count, [1, R - 1 + tokens]
tokens) and padded (every row padded to the prompt, [R, tokens], as before). On the CPU the times alone (no
allocator statistics).

Offloaded engine (``--offload-engine-models``): a replica's case, a prompt of ``--offload-engine-tokens`` joining
``--engine-rows`` - 1 rows that decode, on an offloaded Engine (as above, default 256 MiB reserve), fed at the chunk
``--prefill-chunk auto`` picks (since session 32 a step's budget across its rows, the step packed) and at the
per-row chunk it picked before (rows x chunk tokens inside the reserve): seconds to that prompt's first token
(each chunk's round after one that compiles its kernels) beside the offloaded rows' floor (every uncached expert
copied once), and the decoding rows' tokens per second meanwhile.

Mixed steps (``--mixed-models``): one step of each MIXED case (prompts joining decoding rows, or arriving together,
on an 8-row engine of ``--mixed-layers`` layers) packed (attention over the step in one launch where the model can:
kernels.packed_attention), packed with attention part by part, padded, and as the engine chooses
(``Engine._pays_to_pack``: a part attended on its own costs host time, padding GPU time per padded token).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe.config import MoEConfig  # noqa: E402
from moe.model import MoEForCausalLM  # noqa: E402
from offload import prefill_activation_bytes  # noqa: E402

SHAPES = {
    "mixtral": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, num_attention_heads=32,
                    num_key_value_heads=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336,
                    intermediate_size=14336),
    "qwen3": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_attention_heads=32,
                  num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                  moe_intermediate_size=768, intermediate_size=6144),
    "dsv2lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, num_attention_heads=16,
                     num_key_value_heads=16, num_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408,
                     intermediate_size=10944, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=2, first_k_dense_replace=1),
    "olmoe": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=128, num_experts=64, num_experts_per_tok=8,
                  moe_intermediate_size=1024, intermediate_size=1024),
    "tiny": dict(model_type="qwen3_moe", vocab_size=512),
}
GRID = [(1, 0, 128), (1, 0, 512), (1, 0, 2048), (1, 0, 8192), (4, 0, 512), (4, 0, 2048), (1, 8192, 512),
        (1, 8192, 2048), (1, 16384, 2048)]


def config(key: str, layers: int) -> MoEConfig:
    kw = dict(SHAPES[key])
    return MoEConfig.tiny(kw.pop("model_type"), num_hidden_layers=layers, max_position_embeddings=32768, **kw)


def measured(fn, on_gpu: bool = True) -> tuple[int | None, float]:
    """(peak device bytes above the allocation before it, seconds) of one call of ``fn``; no peak off a GPU."""
    if on_gpu:
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fn()
    if on_gpu:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return (torch.cuda.max_memory_allocated() - base if on_gpu else None), secs


def peak_forward(m, B: int, L: int, T: int, dev: str, packed: bool = False) -> tuple[float, float]:
    """(peak bytes above the baseline, seconds) of one forward of B x T new tokens on a cache at length L; ``packed``:
    as one packed step of the B rows' runs (forward(segments=...), the engine's way since session 34), not padded."""
    cache = m.new_cache(B, L + T + 1)
    ids = torch.randint(0, m.config.vocab_size, (B, T), device=dev)
    kw = dict(segments=[(B, T)]) if packed else {}
    feed = ids.reshape(1, B * T) if packed else ids
    with torch.inference_mode():
        m(ids[:, :1], cache=cache, last_only=True)  # every layer's KV storage allocated before the baseline
        best_t, peak = float("inf"), 0
        for _ in range(2):
            cache.lengths.fill_(L)
            p, t = measured(lambda: m(feed, cache=cache, last_only=True, **kw))
            best_t, peak = min(best_t, t), max(peak, p)
    del cache
    return peak, best_t


def peaks_transformers(key: str, layers: int, points: list[tuple[int, int]], log) -> dict:
    """{(B, T): peak bytes} of transformers' own model (same family and shape, bf16, sdpa), one forward of B x T
    tokens from an empty DynamicCache each; {} (said) where transformers cannot build or run it."""
    try:
        import transformers
        from transformers import DynamicCache
        cfg = config(key, layers)
        hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
        hf_cfg._attn_implementation = "sdpa"
        with torch.device("cuda"):
            hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.bfloat16).eval()
    except Exception as e:  # a peer that cannot run is reported, not fatal
        log({"model": key, "mode": "transformers", "error": f"{type(e).__name__}: {e}"[:300]})
        return {}
    out = {}
    for B, T in points:
        ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
        try:
            with torch.inference_mode():
                out[(B, T)] = measured(lambda: hf(input_ids=ids, past_key_values=DynamicCache(), use_cache=True,
                                                  logits_to_keep=1))[0]
        except Exception as e:
            log({"model": key, "mode": "transformers", "B": B, "T": T, "error": f"{type(e).__name__}: {e}"[:300]})
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return out


def copy_rate() -> float:
    """Bytes/s of a 256 MiB pinned host -> device copy (best of 5)."""
    src = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return src.numel() / best


def offloaded_model(key: str, layers: int):
    """(config, the model of ``layers`` layers under apply_offload: device driver, LFU, a quarter of each layer's
    experts cached, the default reserve; the floor in seconds: every uncached expert copied once at the link rate
    measured here (a 256 MiB pinned copy), bytes/s of that rate)."""
    from offload import OffloadConfig, apply_offload
    cfg = config(key, layers)
    m = MoEForCausalLM(cfg, backend="triton", dtype=torch.bfloat16, device="cuda")
    m.init_weights(seed=0)  # on the GPU (seconds on the CPU at these sizes), then to host memory for apply_offload
    m = m.to("cpu")
    torch.cuda.empty_cache()
    slots = max(cfg.num_experts_per_tok, cfg.num_experts // 4)
    m = apply_offload(m.eval(), OffloadConfig(slots_per_layer=slots, driver="device", policy="lfu"))
    rate = copy_rate()
    expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
    return cfg, m, layers * (cfg.num_experts - slots) * expert_bytes / rate, rate


def offloaded(key: str, layers: int, tokens: int, chunks: list[int], rows_out: list, log) -> None:
    cfg, m, floor, rate = offloaded_model(key, layers)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device="cuda")
    for chunk in [tokens] + [c for c in chunks if c < tokens]:
        cache = m.new_cache(1, tokens + 1)
        with torch.inference_mode():
            m(ids[:, :1], cache=cache, last_only=True)
            best_t, peak = float("inf"), 0

            def prefill():
                for a in range(0, tokens, chunk):
                    m(ids[:, a:a + chunk], cache=cache, last_only=True)
            for _ in range(2):
                cache.lengths.fill_(0)
                p, t = measured(prefill)
                best_t, peak = min(best_t, t), max(peak, p)
        del cache
        n_chunks = -(-tokens // chunk)
        row = dict(model=key, mode="offloaded", tokens=tokens, chunk=chunk, chunks=n_chunks, ms=best_t * 1e3,
                   floor_ms=floor * 1e3, peak_mib=peak / 2 ** 20,
                   bound_mib=prefill_activation_bytes(cfg, 1, chunk, tokens + 1, torch.bfloat16) / 2 ** 20,
                   copy_gbs=rate / 1e9)
        rows_out.append(row)
        log(row)
    del m
    release(True)


class _Tok:  # the engine needs ids only: no tokenizer files for random weights
    eos_token_ids: list = []

    def detokenizer(self, ids):
        return type("D", (), {"push": lambda self, t: "", "flush": lambda self: ""})()


def per_row_chunk(cfg, reserve: int, rows: int, max_len: int) -> int:
    """What ``--prefill-chunk auto`` gave before session 32, when the chunk was each row's: the largest power of two
    whose rows x chunk tokens fit the reserve (prefill_activation_bytes), at least 16."""
    chunk = 16
    while chunk * 2 < max_len and prefill_activation_bytes(cfg, rows, chunk * 2, max_len, torch.bfloat16) <= reserve:
        chunk *= 2
    return chunk


def offloaded_engine(key: str, layers: int, rows: int, tokens: int, rows_out: list, log) -> None:
    """A replica's case under offloading: a prompt of ``tokens`` joining rows - 1 rows that decode, on an Engine of
    ``rows`` rows with the default 256 MiB reserve, fed at the chunk ``auto`` picks (a step's budget, packed) and at
    the per-row chunk it picked before session 32: seconds to the prompt's first token and the decode rows' tokens/s
    meanwhile."""
    from moe.generate import Engine
    from moe.sampling import SamplingParams
    from offload import auto_prefill_chunk
    cfg, m, floor, _ = offloaded_model(key, layers)
    max_len = tokens + 128
    new = auto_prefill_chunk(m, rows, max_len)
    old = per_row_chunk(cfg, m.offload_config.reserve_bytes, rows, max_len)
    prompt = torch.randint(0, cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    def joining(chunk):
        e = Engine(m, _Tok(), max_batch_size=rows, max_len=max_len, cuda_graph=False, prefill_chunk=chunk)
        for i in range(rows - 1):
            e.add_request(prompt[i:i + 64], SamplingParams(max_new_tokens=100000, ignore_eos=True))
        for _ in range(3):
            e.step()
        rid = e.add_request(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
        torch.cuda.synchronize()
        t0, steps, decoded, done = time.perf_counter(), 0, 0, False
        while not done:
            outs = e.step()
            steps += 1
            done = any(o.request_id == rid for o in outs)
            decoded += sum(len(o.new_token_ids) for o in outs if o.request_id != rid)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, steps, decoded

    for how, chunk in (("auto (step budget)", new), ("per-row (before)", old)):
        joining(chunk)  # the kernels of these token counts compile here (seconds each), not in the timed round
        secs, steps, decoded = joining(chunk)
        row = dict(model=key, mode="offloaded engine", rows=rows, tokens=tokens, how=how, chunk=chunk, steps=steps,
                   ttft_s=secs, floor_s=floor, decode_tps=decoded / secs)
        rows_out.append(row)
        log(row)
    del m
    release(True)


def random_model(key: str, layers: int, device: str):
    """(config, the model of ``layers`` layers of shape ``key`` with random weights, on a GPU?): bf16 with the triton
    experts on a GPU, float32 with the torch ones on the CPU."""
    cfg = config(key, layers)
    on_gpu = device == "cuda"
    m = MoEForCausalLM(cfg, backend="triton" if on_gpu else "torch", dtype=torch.bfloat16 if on_gpu else torch.float32,
                       device=device)
    m.init_weights(seed=0)
    return cfg, m.eval(), on_gpu


def release(on_gpu: bool) -> None:
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()


def engine_rows(key: str, layers: int, rows: int, tokens: int, device: str, log) -> list[dict]:
    """A lone request's prefill step on an Engine of ``rows`` rows: by row prefix (the engine's way) and all rows."""
    from unittest import mock

    from moe.generate import Engine
    from moe.sampling import SamplingParams
    cfg, m, on_gpu = random_model(key, layers, device)

    prompt = torch.randint(0, cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    out = []

    def engine_for(how):
        """A fresh engine, then the step to time: a lone prompt's (prefix, all rows), or the same prompt's joining
        rows - 1 rows that decode 64-token prompts (joins packed: the engine's way, [1, rows - 1 + tokens]; joins
        padded: [rows, tokens], as before session 32)."""
        e = Engine(m, _Tok(), max_batch_size=rows, max_len=tokens + 80, cuda_graph=False)
        if how.startswith("joins"):
            e._packed = e._packed and how == "joins packed"
            e.pack_tokens_per_part = 0  # (packed whatever it saves: what the row measures)
            for i in range(rows - 1):
                e.add_request(prompt[i:i + 64], SamplingParams(max_new_tokens=8, ignore_eos=True))
            e.step()
            e.step()
        e.add_request(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
        return e

    for how in ("prefix", "all rows", "joins packed", "joins padded"):
        # "all rows": the engine's prefix is taken for plain KVCaches only; hiding the class runs every row
        patch = mock.patch("moe.generate.KVCache", type("NotAKVCache", (), {})) if how == "all rows" else \
            contextlib.nullcontext()
        best, peak = float("inf"), None
        with patch:
            for _ in range(2):
                e = engine_for(how)
                peak, t = measured(e.step, on_gpu)
                best = min(best, t)
                del e
        row = dict(model=key, mode="engine", rows=rows, tokens=tokens, how=how, ms=best * 1e3,
                   peak_mib=None if peak is None else peak / 2 ** 20)
        out.append(row)
        log(row)
    del m
    release(on_gpu)
    return out


MIXED = {  # steps where packing may not pay: (decoding rows with 64-token histories, prompts joining at once)
    "8 prompts 20-60": (0, [20, 27, 33, 38, 44, 49, 55, 60]),
    "8 prompts 100-800": (0, [100, 190, 280, 370, 460, 550, 640, 800]),
    "7 dec + 32": (7, [32]),
    "7 dec + 256": (7, [256]),
    "7 dec + 2048": (7, [2048]),
    "4 dec + 4 x 40-70": (4, [40, 50, 60, 70]),
    "4 dec + 4 x 200-500": (4, [200, 300, 400, 500]),
    "1 dec + 16": (1, [16]),
}


def mixed_steps(key: str, layers: int, device: str, log, cases: list[str] | None = None) -> list[dict]:
    """One step of each MIXED case on an 8-row engine: packed (every such step; attention over the step in one
    launch where the model can, kernels.packed_attention), packed with attention part by part ("parts":
    PACKED_ATTENTION 'never', session 32's packed step), padded ([rows, T]) and the engine's own choice
    (Engine._pays_to_pack); best of 5 after a compiling round, the orders alternated."""
    import moe.attention as attention
    from moe.generate import Engine
    from moe.sampling import SamplingParams
    cfg, m, on_gpu = random_model(key, layers, device)
    g = torch.Generator().manual_seed(0)
    out = []
    for name, (dec, lens) in MIXED.items():
        if cases is not None and name not in cases:
            continue
        best = {}
        for how in ("packed", "parts", "padded", "engine") * 2:
            attention.PACKED_ATTENTION = "never" if how == "parts" else "auto"
            for rep in range(4):
                e = Engine(m, _Tok(), max_batch_size=8, max_len=max(lens) + 80, cuda_graph=False)
                e._packed = e._packed and how != "padded"
                if how in ("packed", "parts"):
                    e.pack_tokens_per_part = 0
                for _ in range(dec):
                    e.add_request(torch.randint(0, cfg.vocab_size, (64,), generator=g).tolist(),
                                  SamplingParams(max_new_tokens=50, ignore_eos=True))
                if dec:
                    e.step()
                    e.step()
                for n in lens:
                    e.add_request(torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(),
                                  SamplingParams(max_new_tokens=1, ignore_eos=True))
                _, t = measured(e.step, on_gpu)
                if rep:  # (the first round of each compiles)
                    best[how] = min(best.get(how, float("inf")), t)
        attention.PACKED_ATTENTION = "auto"
        row = dict(model=key, mode="mixed", case=name, layers=layers, **{f"{h}_ms": v * 1e3 for h, v in best.items()})
        out.append(row)
        log(row)
    del m
    release(on_gpu)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral,qwen3,dsv2lite,olmoe")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers built (the peak is one layer's)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--peers", default="", help="'transformers': its own model's peak beside ours (L = 0 rows)")
    ap.add_argument("--offload-models", default="mixtral,qwen3", help="models of the offloaded rows ('' for none)")
    ap.add_argument("--offload-tokens", type=int, default=4096)
    ap.add_argument("--chunks", default="1024,256")
    ap.add_argument("--engine-models", default="", help="models of the engine-rows timing ('' for none)")
    ap.add_argument("--engine-rows", type=int, default=8)
    ap.add_argument("--engine-tokens", type=int, default=2048)
    ap.add_argument("--offload-engine-models", default="", help="models of the offloaded engine case ('' for none)")
    ap.add_argument("--mixed-models", default="", help="models of the packed / padded mixed steps ('' for none)")
    ap.add_argument("--mixed-layers", type=int, default=4)
    ap.add_argument("--mixed-cases", default="", help="';'-separated names of MIXED cases (default: all)")
    ap.add_argument("--offload-engine-tokens", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    keys = [k for k in args.models.split(",") if k]
    for k in keys + [k for k in ",".join((args.offload_models, args.offload_engine_models, args.mixed_models)).split(",")
                     if k]:
        if k not in SHAPES:
            ap.error(f"unknown model {k!r}; known: {', '.join(SHAPES)}")
    for c in [c for c in args.mixed_cases.split(";") if c]:
        if c not in MIXED:
            ap.error(f"unknown mixed case {c!r}; known: {'; '.join(MIXED)}")
    rows: list[dict] = []

    def log(row):
        print(json.dumps(row), flush=True)

    engine_keys = [k for k in args.engine_models.split(",") if k]
    for k in engine_keys:
        if k not in SHAPES:
            ap.error(f"unknown model {k!r}; known: {', '.join(SHAPES)}")

    def engine_table():
        got = [r for key in engine_keys
               for r in engine_rows(key, args.layers, args.engine_rows, args.engine_tokens, args.device, log)]
        rows.extend(got)
        if got:
            print(f"\n{'engine':9} {'rows':>4} {'tokens':>6} {'how':>12} {'ms':>8} {'peak MiB':>9}")
        for r in got:
            peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
            print(f"{r['model']:9} {r['rows']:>4} {r['tokens']:>6} {r['how']:>12} {r['ms']:>8.2f} {peak:>9}")

    def mixed_table():
        got = [r for key in [k for k in args.mixed_models.split(",") if k]
               for r in mixed_steps(key, args.mixed_layers, args.device, log,
                                    [c for c in args.mixed_cases.split(";") if c] or None)]
        rows.extend(got)
        if got:
            print(f"\n{'mixed':9} {'case':22} {'packed ms':>9} {'parts ms':>9} {'padded ms':>9} {'engine ms':>9}")
        for r in got:
            print(f"{r['model']:9} {r['case']:22} {r['packed_ms']:>9.2f} {r['parts_ms']:>9.2f} {r['padded_ms']:>9.2f} "
                  f"{r['engine_ms']:>9.2f}")

    if args.device == "cpu":  # no allocator statistics: the bound alone, a check of the script
        for key in keys:
            cfg = config(key, args.layers)
            for B, L, T in GRID:
                rows.append(dict(model=key, mode="bound", B=B, L=L, T=T,
                                 bound_mib=prefill_activation_bytes(cfg, B, T, L + T, torch.float32) / 2 ** 20))
        for r in rows:
            print(f"{r['model']:9} B={r['B']} L={r['L']:>5} T={r['T']:>5}  bound {r['bound_mib']:9.1f} MiB")
        engine_table()
        mixed_table()
        return 0
    if not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA device (use --device cpu for the bound alone)")
    for key in keys:
        cfg, m, _ = random_model(key, args.layers, "cuda")
        with torch.inference_mode():  # (the engine asks at inference: no gradient wanted of the weights)
            packs = m.packs_in_one_pass(m.new_cache(1, 8))
        for B, L, T in GRID:
            peak, secs = peak_forward(m, B, L, T, "cuda")
            bound = prefill_activation_bytes(cfg, B, T, L + T, torch.bfloat16)
            row = dict(model=key, mode="resident", B=B, L=L, T=T, peak_mib=peak / 2 ** 20, bound_mib=bound / 2 ** 20,
                       x=bound / max(peak, 1), ms=secs * 1e3)
            if packs:  # the same tokens as one packed step (the engine's way since session 34)
                ppeak, psecs = peak_forward(m, B, L, T, "cuda", packed=True)
                row.update(packed_peak_mib=ppeak / 2 ** 20, packed_x=bound / max(ppeak, 1), packed_ms=psecs * 1e3)
            rows.append(row)
            log(row)
        del m
        release(True)
        if "transformers" in args.peers:
            for (B, T), hf in peaks_transformers(key, args.layers, [(B, T) for B, L, T in GRID if L == 0], log).items():
                row = dict(model=key, mode="transformers", B=B, L=0, T=T, peak_mib=hf / 2 ** 20)
                rows.append(row)
                log(row)
    chunks = [int(c) for c in args.chunks.split(",") if c]
    for key in [k for k in args.offload_models.split(",") if k]:
        offloaded(key, args.layers, args.offload_tokens, chunks, rows, log)
    engine_table()
    mixed_table()
    got = []
    for key in [k for k in args.offload_engine_models.split(",") if k]:
        offloaded_engine(key, args.layers, args.engine_rows, args.offload_engine_tokens, got, log)
    rows.extend(got)
    if got:
        print(f"\n{'offloaded':9} {'rows':>4} {'tokens':>6} {'chunk':>23} {'steps':>5} {'to 1st s':>8} {'floor s':>7} "
              f"{'x floor':>7} {'decode t/s':>10}")
    for r in got:
        print(f"{r['model']:9} {r['rows']:>4} {r['tokens']:>6} {r['how'] + ' ' + str(r['chunk']):>23} {r['steps']:>5} "
              f"{r['ttft_s']:>8.3f} {r['floor_s']:>7.3f} {r['ttft_s'] / r['floor_s']:>7.1f} {r['decode_tps']:>10.1f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "prefill_memory.json").write_text(json.dumps(rows, indent=1))
    hf = {(r["model"], r["B"], r["T"]): r["peak_mib"] for r in rows if r["mode"] == "transformers"}
    print(f"\n{'model':9} {'B':>2} {'L':>6} {'T':>5} {'peak MiB':>9} {'bound':>8} {'x':>5} {'transformers':>12} {'ms':>7}"
          f" {'packed MiB':>10} {'x':>5} {'ms':>7}")
    for r in rows:
        if r["mode"] == "resident":
            peer = hf.get((r["model"], r["B"], r["T"])) if r["L"] == 0 else None
            packed = (f" {r['packed_peak_mib']:>10.1f} {r['packed_x']:>5.2f} {r['packed_ms']:>7.2f}"
                      if "packed_peak_mib" in r else f" {'-':>10}")
            print(f"{r['model']:9} {r['B']:>2} {r['L']:>6} {r['T']:>5} {r['peak_mib']:>9.1f} {r['bound_mib']:>8.1f} "
                  f"{r['x']:>5.2f} {peer if peer is None else round(peer, 1)!s:>12} {r['ms']:>7.2f}{packed}")
    print(f"\n{'offloaded':9} {'tokens':>6} {'chunk':>5} {'ms':>8} {'floor ms':>8} {'x floor':>7} {'peak MiB':>9} "
          f"{'bound':>8} {'GB/s':>5}")
    for r in rows:
        if r["mode"] == "offloaded":
            print(f"{r['model']:9} {r['tokens']:>6} {r['chunk']:>5} {r['ms']:>8.1f} {r['floor_ms']:>8.1f} "
                  f"{r['ms'] / r['floor_ms']:>7.2f} {r['peak_mib']:>9.1f} {r['bound_mib']:>8.1f} {r['copy_gbs']:>5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
