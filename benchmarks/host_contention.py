"""Do pinned host->device copies and CPU expert computation run side by side at full speed?

    python benchmarks/host_contention.py            # a CUDA machine; Mixtral-8x7B expert shapes
    python benchmarks/host_contention.py --experts 4 --hidden 4096 --ffn 14336 --threads 16,12,8,4

Both read the experts' weights from host DRAM: the copy engine over PCIe, the CPU through its
caches. The offload and CPU-tier splits (offload/slices.py, offload/tiered_slices.py) assume the
two add up; this measures, for each CPU thread count, the time of copying N experts, of computing
N experts at one token on the CPU (the plain reference, kernels.expert_mlp_reference), and of both
at once (copies queued on a side stream, then the CPU work), median of --reps. The ceiling printed
beside them: the combined bytes both read per second when run together.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import expert_mlp_reference  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--threads", default="16,12,8,4")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_contention: needs a CUDA device (it measures host->device copies)", file=sys.stderr)
        return 2
    n, D, I = args.experts, args.hidden, args.ffn
    bf = torch.bfloat16
    # separate weights for the copies and the CPU, so that neither reads what the other just cached
    w13 = [torch.randn(2 * I, D, dtype=bf).pin_memory() for _ in range(n)]
    w2 = [torch.randn(D, I, dtype=bf).pin_memory() for _ in range(n)]
    c13 = [torch.randn(2 * I, D, dtype=bf).pin_memory() for _ in range(n)]
    c2 = [torch.randn(D, I, dtype=bf).pin_memory() for _ in range(n)]
    g13 = torch.empty(n, 2 * I, D, dtype=bf, device="cuda")
    g2 = torch.empty(n, D, I, dtype=bf, device="cuda")
    x = torch.randn(1, D, dtype=bf)
    side = torch.cuda.Stream()
    gb = n * 3 * D * I * 2 / 1e9

    def copy():
        with torch.cuda.stream(side):
            for i in range(n):
                g13[i].copy_(w13[i], non_blocking=True)
                g2[i].copy_(w2[i], non_blocking=True)

    def cpu():
        for i in range(n):
            expert_mlp_reference(x, c13[i], c2[i])

    def timed(fn) -> float:
        times = []
        for _ in range(args.reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2] * 1e3

    print(f"{n} experts of D={D}, I={I} (bf16, {gb:.2f} GB) on {torch.cuda.get_device_name()}; median of {args.reps}")
    print(f"{'threads':>7} {'copy ms':>9} {'GB/s':>6} {'CPU ms':>9} {'GB/s':>6} {'both ms':>9} {'sum ms':>9} "
          f"{'max ms':>9} {'both GB/s':>10}")
    for th in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(th)
        a, b = timed(copy), timed(cpu)
        both = timed(lambda: (copy(), cpu()))
        print(f"{th:>7} {a:9.2f} {gb / a * 1e3:6.1f} {b:9.2f} {gb / b * 1e3:6.1f} {both:9.2f} {a + b:9.2f} "
              f"{max(a, b):9.2f} {2 * gb / both * 1e3:10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
