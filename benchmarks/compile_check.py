"""Compile every Triton kernel a fused MoE call launches, for the tuned configs, without a GPU.

    /tmp/t36/bin/python benchmarks/compile_check.py                    # all shapes, every tuned token count
    /tmp/t36/bin/python benchmarks/compile_check.py --dump ptx_a       # also write each kernel's PTX
    diff -r ptx_a ptx_b                                                # two trees: same PTX, same timing

Why: the H200 machine compiles with Triton 3.6 while this machine has 3.8, and 3.6 compiles some
code that 3.8 folds away (both sides of an ``if`` that looks static; session 8 lost three device runs
to it). Run this under the GPU machine's Triton, from a venv made once with the wheel on disk:
``python -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 torch==2.13.0 numpy``.

How: a stand-in CUDA driver answers for an sm_90 device; every kernel launch compiles (Triton's own
pipeline down to a cubin, with its bundled ptxas) and returns without running; the host-side checks
for TMA and programmatic dependent launch answer as on a Hopper GPU; tensors live on the CPU and are
never read by a kernel. Each (shape, token count) runs the forward of ``fused_moe`` with its tuned
config, and the forward + backward where training reaches that size (64, 4096, 16384 tokens); then
the other inference kernels (norm, router, q/k/v projections, attention prep, decode attention, a packed step's
attention in every variant) at each model's sizes. Line
information is left out of the PTX, so a refactor that moves code but compiles to the same PTX shows
no difference in ``--dump``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)  # run as a script: import the kernels package, not benchmarks/kernels.py

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DISABLE_LINE_INFO"] = "1"

import torch  # noqa: E402

FWD_BWD_TOKENS = (64, 4096, 16384)
# attention heads of the models behind SHAPES: (query heads, key/value heads, head size), for the
# decode-step kernels (norms, router, q/k/v projections, q/k norm + rotation + cache write)
HEADS = {"mixtral": (32, 8, 128), "qwen3": (32, 4, 128), "dsv2lite": (16, 16, 128), "olmoe": (16, 16, 128)}


class _StandInCuda:
    """What Triton's launcher asks of a driver before it compiles, for an sm_90 device."""

    def __init__(self, capability: int = 90):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_benchmarker(self):
        raise RuntimeError("compile_check runs nothing")


H200_SMS = 132


def install(log_compiled: list) -> None:
    """Route every launch to compile-only and make the kernels' host checks answer as on a Hopper GPU."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import kernels.fused_decode as fd
    import kernels.fused_moe as fm
    import kernels.grouped_gemm as gg
    import kernels.launch as kl
    import kernels.packed_attention as pa
    import kernels.wgrad as wg
    driver.set_active(_StandInCuda())
    kl.ENABLED = False  # every launch through JITFunction.run (below): a compiled kernel is never run
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        k = run(self, *args, grid=grid, warmup=True, **kwargs)
        log_compiled.append((self.fn.__name__, k))
        return k
    JITFunction.run = compile_only
    for mod in (gg, fm, wg, pa):
        mod.tma_ok = lambda t: True
    for mod in (gg, fm, fd):
        mod.pdl_ok = lambda t: True
    gg._sm_count = lambda index: H200_SMS  # the persistent grids' size (it shapes no compiled code)
    fm._check_device = lambda *a: None


def check(shapes, tokens, dump: Path | None, compiled: list, log=print) -> int:
    """Forward (and fwd+bwd) MoE calls with the tuned configs; ``compiled`` is install()'s log."""
    from benchmarks.tune_kernels import SHAPES
    from kernels.fused_moe import fused_moe
    from kernels.launch_config import load_tuned
    failures = 0
    for key in shapes:
        name, E, D, I, K = SHAPES[key]
        table = load_tuned(E, I, D, "NVIDIA H200") or {}
        w13 = torch.empty(E, 2 * I, D, dtype=torch.bfloat16)
        w2 = torch.empty(E, D, I, dtype=torch.bfloat16)
        for T in tokens or sorted(table):
            if T not in table:
                log(f"  {key} T={T}: no tuned entry; skipped")
                continue
            cfg = table[T]
            g = torch.Generator().manual_seed(T)
            x = torch.randn(T, D, generator=g).to(torch.bfloat16)
            ids = torch.rand(T, E, generator=g).topk(K, dim=1).indices
            w = torch.softmax(torch.rand(T, K, generator=g), dim=1).to(torch.bfloat16)
            phases = [("fwd", False)] + ([("fwdbwd", True)] if T in FWD_BWD_TOKENS else [])
            for phase, grad in phases:
                start = len(compiled)
                try:
                    if grad:
                        # (no gradient for the routing weights: its host-side scatter would read the
                        # never-computed alignment; the kernels launched are the same either way)
                        xs, a, b = (t.detach().requires_grad_(True) for t in (x, w13, w2))  # no copies
                        y = fused_moe(xs, a, b, ids, w, config=cfg)
                        torch.autograd.grad(y, [xs, a, b], torch.ones_like(y))
                    else:
                        with torch.no_grad():
                            fused_moe(x, w13, w2, ids, w, config=cfg)
                except Exception as exc:  # noqa: BLE001 - the point is to report it
                    failures += 1
                    log(f"  FAILED {key} T={T} {phase}: {type(exc).__name__}: {str(exc)[:600]}")
                    continue
                done = compiled[start:]
                log(f"  ok {key} T={T} {phase}: " + ", ".join(n for n, _ in done))
                if dump is not None:
                    dump.mkdir(parents=True, exist_ok=True)
                    for i, (n, k) in enumerate(done):
                        (dump / f"{key}-T{T}-{phase}-{i:02d}-{n}.ptx").write_text(k.asm["ptx"])
    return failures


def packed_attention_variants(H: int, G: int, d: int, e: int) -> None:
    """kernels.packed_attention's launches of a packed step: blocks of several tokens and decoding rows in the main
    table, then (every_variant) pieces merged by the second kernel, the one-token table's 16-row tiles and the wide
    table's 128-row tiles with keys and values by TMA, then a sliding window."""
    from kernels.packed_attention import block_table, every_variant, group_rows, packed_attention
    bf = torch.bfloat16
    R, TB = group_rows(H, G)
    k, v = torch.empty(4, G, 257, d, dtype=bf), torch.empty(4, G, 257, e, dtype=bf)
    q = torch.randn(H, 14, d).to(bf)
    args = ([0, 1, 2, 3], [0, 1, 2, 12], [1, 1, 10, 2], [200, 50, 100, 30], TB, "cpu", 256)
    packed_attention(q, k, v, block_table(*args, kv_heads=G), d ** -0.5)
    with every_variant(split=64):
        packed_attention(q, k, v, block_table(*args, kv_heads=G), d ** -0.5)
    packed_attention(q, k, v, block_table(*args, window=32, kv_heads=G), d ** -0.5)


def check_decode(shapes, rows=(1, 8, 64), log=print, dump: Path | None = None, compiled: list | None = None) -> int:
    """The other inference kernels (kernels/norm, router, proj, attn_prep, decode_attention, packed_attention, unpack)
    at each model's sizes; with ``dump`` (and install()'s log) each one's PTX written there too."""
    from benchmarks.tune_kernels import SHAPES
    from kernels.attn_prep import prepare_qkv
    from kernels.decode_attention import decode_attention
    from kernels.norm import rms_norm
    from kernels.proj import multi_linear
    from kernels.router import softmax_topk
    from kernels.unpack import pack_bf16, unpack_bf16
    failures = 0
    bf = torch.bfloat16
    for key in shapes:
        _, E, D, I, K = SHAPES[key]
        H, G, d = HEADS[key]
        for M in rows:
            x = torch.randn(M, D).to(bf)
            steps = {
                "rms_norm": lambda: rms_norm(x, torch.ones(D, dtype=bf), 1e-6),
                "softmax_topk": lambda: softmax_topk(torch.randn(M, E).to(bf), K, True),
                "multi_linear": lambda: multi_linear(x, [torch.empty(H * d, D, dtype=bf), torch.empty(G * d, D, dtype=bf),
                                                         torch.empty(G * d, D, dtype=bf)]),
                "prepare_qkv": lambda: prepare_qkv(
                    torch.randn(M, 1, H * d).to(bf), torch.randn(M, 1, G * d).to(bf), torch.randn(M, 1, G * d).to(bf),
                    torch.ones(M, 1, d // 2), torch.zeros(M, 1, d // 2), torch.ones(d, dtype=bf), torch.ones(d, dtype=bf),
                    1e-6, torch.empty(M, G, 16, d, dtype=bf), torch.empty(M, G, 16, d, dtype=bf),
                    torch.zeros(M, 1, dtype=torch.long), H, G),
                # 512 slots: two chunks, so the merge kernel compiles too; the model's additive mask
                "decode_attention": lambda: decode_attention(
                    torch.randn(M, H, 1, d).to(bf), torch.empty(M, G, 512, d, dtype=bf), torch.empty(M, G, 512, d, dtype=bf),
                    torch.zeros(M, 1, 1, 512, dtype=bf), d ** -0.5),
                # a packed step's attention, every variant (DeepSeek-V2-Lite: MLA's 192-wide keys, 128-wide values)
                "packed_attention": lambda: packed_attention_variants(H, G, 192 if key == "dsv2lite" else d, d),
                # a packed expert (offload pack_experts), with escapes so that the escape loop compiles too
                "unpack_bf16": lambda: unpack_bf16(*pack_bf16(torch.tensor([0.0, 1e30, 0.5, 0.25], dtype=bf),
                                                             torch.tensor([2.0, 3.0], dtype=bf)),
                                                   torch.empty(4, dtype=bf), torch.empty(2, dtype=bf)),
            }
            failed = 0
            for name, step in steps.items():
                start = len(compiled) if compiled is not None else 0
                try:
                    step()
                except Exception as exc:  # noqa: BLE001 - the point is to report it
                    failed += 1
                    log(f"  FAILED {key} {name} rows={M}: {type(exc).__name__}: {str(exc)[:600]}")
                    continue
                if dump is not None and compiled is not None:
                    dump.mkdir(parents=True, exist_ok=True)
                    for i, (n, k) in enumerate(compiled[start:]):
                        (dump / f"{key}-rows{M}-{name}-{i:02d}-{n}.ptx").write_text(k.asm["ptx"])
            if not failed:
                log(f"  ok {key} decode kernels, {M} rows")
            failures += failed
    return failures


def main(argv=None) -> int:
    from benchmarks.tune_kernels import SHAPES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="", help="comma list; default every token count of the tuned files")
    ap.add_argument("--dump", type=Path, default=None, help="write each compiled kernel's PTX here")
    args = ap.parse_args(argv)
    import triton
    print(f"Triton {triton.__version__}, target sm_90 (stand-in driver)")
    tokens = [int(t) for t in args.tokens.split(",") if t]
    compiled: list = []
    install(compiled)
    failures = (check(args.shapes.split(","), tokens, args.dump, compiled)
                + check_decode(args.shapes.split(","), dump=args.dump, compiled=compiled))
    print(json.dumps({"failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
