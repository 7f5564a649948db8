"""Cost of a missed expert: copy it to the device, or compute it on the CPU (Fiddler).

    copy_s(bytes)       = copy_latency_s + bytes / copy_bytes_per_s
    cpu_s(n_tokens)     = cpu_base_s + n_tokens * cpu_per_token_s

Both rates are measured at start-up on the machine at hand (`CostModel.calibrate`): a pinned
host->device copy of one expert, and one expert's SwiGLU MLP on the CPU at 1 and at 8 tokens
on weights that are not in the CPU's cache (at one token the CPU reads the whole expert from
memory, so the base term dominates; the slope is the compute rate). `split` then shares a step's
misses between the copy engine and the CPU so that both finish together: the two are separate
resources and an oracle uses both.

In use the CPU can be slower than at start-up (the copy engine reads the same host memory, the
host thread has other work): `observe_cpu` feeds back the measured time of each step's CPU
experts and `cpu_s` scales by the learned ratio (`cpu_scale`), so the split follows the machine
as it runs, not as it was calibrated.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


# CPU calibration rotates over copies of the expert that together exceed this (a last-level cache
# holds tens of MB), at most MAX_COLD_COPIES of them
COLD_BYTES = 256 << 20
MAX_COLD_COPIES = 64


def _timeit(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bytes_per_s(device, src: torch.Tensor, min_s: float = 0.02) -> float:
    """Measured host -> ``device`` copy rate of ``src`` (pinned first, on a GPU), bytes/s.

    On a GPU each timing runs back-to-back copies for at least ``min_s`` seconds, as a step's misses
    do: one lone copy of 64 MiB after an idle moment read 20 GB/s on the H200 machine, where the
    expert copies of the same run moved 53 GB/s (BENCHMARKS 3j)."""
    device = torch.device(device)
    nbytes = src.numel() * src.element_size()
    if device.type == "cuda":
        src = src if src.is_pinned() else src.pin_memory()
        dst = torch.empty_like(src, device=device)
        torch.cuda.synchronize(device)

        def copies(n: int) -> None:
            for _ in range(n):
                dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
        t1 = _timeit(lambda: copies(1), repeat=1)
        n = max(1, min(1000, int(min_s / max(t1, 1e-9)) + 1))
        return n * nbytes / _timeit(lambda: copies(n))
    dst = torch.empty_like(src)
    return nbytes / _timeit(lambda: dst.copy_(src))


@dataclass
class CostModel:
    copy_bytes_per_s: float
    cpu_base_s: float
    cpu_per_token_s: float
    copy_latency_s: float = 10e-6
    cpu_scale: float = 1.0  # measured / calibrated CPU time, learned in use (observe_cpu)

    def __post_init__(self):
        if self.copy_bytes_per_s <= 0 or self.cpu_base_s < 0 or self.cpu_per_token_s < 0:
            raise ValueError(f"CostModel rates must be positive: copy {self.copy_bytes_per_s} B/s, "
                             f"cpu base {self.cpu_base_s} s, cpu per token {self.cpu_per_token_s} s")

    @classmethod
    def from_rates(cls, copy_gbps: float, cpu_gflops: float, expert_bytes: int, expert_flops_per_token: float,
                   cpu_mem_gbps: float = 50.0) -> "CostModel":
        """From nominal rates: the CPU streams the expert once per call, then pays FLOPs per token."""
        return cls(copy_bytes_per_s=copy_gbps * 1e9, cpu_base_s=expert_bytes / (cpu_mem_gbps * 1e9),
                   cpu_per_token_s=expert_flops_per_token / (cpu_gflops * 1e9))

    @classmethod
    def calibrate(cls, device: torch.device, w13_JD: torch.Tensor, w2_DI: torch.Tensor,
                  cold_bytes: int = COLD_BYTES) -> "CostModel":
        """Measure on this machine with one real expert (host tensors, ideally pinned).

        The CPU is timed on cold weights, as a miss finds them: the calls rotate over copies of the
        expert that together exceed ``cold_bytes`` (more than a CPU's last-level cache), and the
        median call counts. Timing the same expert again and again measured it from the cache: a
        9 MB Qwen3-30B-A3B expert at 0.22 ms on the H200 machine, about its copy time, so half the
        misses went to the CPU and decode ran 2.7x slower than copying them (BENCHMARKS 3d)."""
        from kernels import expert_mlp_reference

        bw = copy_bytes_per_s(device, w13_JD)
        D = w13_JD.shape[1]
        nbytes = w13_JD.numel() * w13_JD.element_size() + w2_DI.numel() * w2_DI.element_size()
        n = max(1, min(MAX_COLD_COPIES, -(-cold_bytes // max(nbytes, 1))))
        experts = [(w13_JD, w2_DI)] + [(w13_JD.clone(), w2_DI.clone()) for _ in range(n - 1)]

        def median_call(x) -> float:
            expert_mlp_reference(x, *experts[0])  # warm-up (threads, allocator)
            ts = []
            for i in range(max(2 * n, 5)):
                t0 = time.perf_counter()
                expert_mlp_reference(x, *experts[i % n])
                ts.append(time.perf_counter() - t0)
            return sorted(ts)[len(ts) // 2]

        t1 = median_call(torch.randn(1, D, dtype=w13_JD.dtype))
        t8 = median_call(torch.randn(8, D, dtype=w13_JD.dtype))
        per_tok = max((t8 - t1) / 7.0, 1e-9)
        return cls(copy_bytes_per_s=bw, cpu_base_s=max(t1 - per_tok, 0.0), cpu_per_token_s=per_tok)

    def copy_s(self, nbytes: int) -> float:
        return self.copy_latency_s + nbytes / self.copy_bytes_per_s

    def cpu_s(self, n_tokens: int) -> float:
        return self.cpu_scale * (self.cpu_base_s + n_tokens * self.cpu_per_token_s)

    def observe_cpu(self, tokens_per_expert: list[int], seconds: float, weight: float = 0.25) -> None:
        """The CPU experts of one call (their token counts) took ``seconds``: cpu_scale moves toward
        measured / calibrated by an exponential average. A CPU found slower than calibrated gets
        fewer misses from then on (none once copying is always cheaper; the scale then stays)."""
        calibrated = sum(self.cpu_base_s + n * self.cpu_per_token_s for n in tokens_per_expert)
        if calibrated <= 0 or seconds <= 0 or not 0 < weight <= 1:
            return
        self.cpu_scale += weight * (seconds / calibrated - self.cpu_scale)

    def split(self, misses: list[tuple[int, int]], expert_bytes: int, copy_backlog_s: float = 0.0,
              reuse: float = 0.0) -> tuple[list[int], list[int], float]:
        """Share misses [(expert, n_tokens)] between copy and CPU so both end together.

        copy_backlog_s: copies already queued on the copy engine (prefetches) ahead of these.
        reuse: the chance that a copied expert is used again while resident (the cache's hit
        ratio): an expert computed on the CPU stays a miss next time, so when choosing, CPU time
        is weighted by 1 + reuse (with reuse 0 this is the plain makespan split).
        Returns (to_copy, to_cpu, estimated seconds until both are done). Experts with few tokens
        go to the CPU first (cheapest there relative to their copy); the cut is the prefix that
        minimises max(weighted CPU time, copy time).
        """
        if not misses:
            return [], [], 0.0
        if not 0.0 <= reuse <= 1.0:
            raise ValueError(f"reuse is a probability, got {reuse}")
        c = self.copy_s(expert_bytes)
        order = sorted(misses, key=lambda m: (self.cpu_s(m[1]), m[0]))
        best_k, best_obj, best_t = 0, copy_backlog_s + c * len(order), copy_backlog_s + c * len(order)
        cpu_t = 0.0
        for k, (_, n) in enumerate(order, start=1):
            cpu_t += self.cpu_s(n)
            copy_t = copy_backlog_s + c * (len(order) - k)
            obj = max(cpu_t * (1.0 + reuse), copy_t)
            if obj < best_obj:
                best_k, best_obj, best_t = k, obj, max(cpu_t, copy_t)
        return [e for e, _ in order[best_k:]], [e for e, _ in order[:best_k]], best_t

    def describe(self) -> str:
        scaled = f" (x{self.cpu_scale:.2f} as measured in use)" if self.cpu_scale != 1.0 else ""
        return (f"copy {self.copy_bytes_per_s / 1e9:.1f} GB/s, CPU expert {self.cpu_base_s * 1e3:.3f} ms "
                f"+ {self.cpu_per_token_s * 1e3:.4f} ms/token{scaled}")
