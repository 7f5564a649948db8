"""Launch configurations of the grouped GEMMs: tuned ones stored as data, a heuristic for the rest.

Tuned files live in ``kernels/configs/`` and are named by shape and GPU, e.g.
``E=128,N=768,K=2048,device_name=NVIDIA_H200.json`` (E experts, N = expert ffn size I, K = hidden
size D). Each maps a token count to one ``MoEConfig``; a call with T tokens takes the entry of the
smallest tuned count >= T (else the largest). ``benchmarks/tune_kernels.py`` writes these files.

Small token counts (decode) get narrow N tiles and long K steps, so that even one token's few
experts spread over every SM and the whole GPU streams the weights; large counts get big tiles that
reuse each weight tile across many rows.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch arithmetic on the host. triton.cdiv / next_power_of_2 are constexpr
    functions, ~2-6 us a call from Python: a decode call made a dozen of them per MoE layer."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _pow2(name: str, v: int, lo: int, hi: int) -> None:
    if v < lo or v > hi or v & (v - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {v}")


@dataclass(frozen=True)
class GemmConfig:
    """Tile of one grouped GEMM (the M tile is shared and lives in MoEConfig)."""
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False      # weight tiles by TMA descriptor (Hopper+, 16-byte aligned strides); else pointers
    a_tma: bool = False    # A rows by TMA descriptor: the up GEMM first gathers x into sorted order (one
                           # memory-bound pass), the down GEMM reads h as it lies; else pointer loads
    tail: int = 0          # an expert's last row block may run as a half (1) or quarter (2) tile when its
                           # real rows fit: the padding's MMA work is skipped
    persistent: int = 0    # > 0: a grid of this many programs per SM, each walking tiles in one flattened
                           # loop (the next tile's loads overlap this one's epilogue); 0: a program per tile.
                           # Needs tma (weight tiles by TMA); calls that cannot have them run per tile

    def __post_init__(self):
        _pow2("block_n", self.block_n, 16, 256)
        _pow2("block_k", self.block_k, 16, 512)
        _pow2("num_warps", self.num_warps, 1, 16)
        if self.group_m < 1 or self.num_stages < 1:
            raise ValueError(f"group_m and num_stages must be >= 1, got {self.group_m}, {self.num_stages}")
        if self.tail not in (0, 1, 2):
            raise ValueError(f"tail must be 0, 1 or 2 (halvings of an expert's last row block), got {self.tail}")
        if self.persistent not in (0, 1, 2):
            raise ValueError(f"persistent must be 0 (a program per tile), 1 or 2 (programs per SM), got {self.persistent}")
        if self.persistent and (self.tail or not self.tma):
            raise ValueError("persistent grids run whole tiles with weight tiles by TMA: set tail=0 and "
                             f"tma=True with persistent > 0 (got tail={self.tail}, tma={self.tma})")


@dataclass(frozen=True)
class FusedDecodeConfig:
    """The one-token kernels (fused_decode.py: up and down projections in one grid, then a fixed-order
    sum): ffn rows per program, the hidden-size step of the up projection (block_d) and of the down
    projection (block_d2)."""
    block_i: int = 32
    block_d: int = 256
    block_d2: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        _pow2("block_i", self.block_i, 16, 256)
        _pow2("block_d", self.block_d, 16, 2048)
        _pow2("block_d2", self.block_d2, 16, 2048)
        _pow2("num_warps", self.num_warps, 1, 16)
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE call's launch settings: the row block (alignment) plus the up and down GEMM tiles;
    ``fused``: one-token inference calls run the fused one-token kernels with these settings instead
    (tuned where it measured faster; None = the three-kernel path). ``bwd_up`` / ``bwd_down``: the
    backward's tiles for dh (SwiGLU backward; run like the up GEMM's rows) and dx (like the down
    GEMM's), where they differ from the forward's (None: the forward's own)."""
    block_m: int = 64
    up: GemmConfig = GemmConfig()
    down: GemmConfig = GemmConfig()
    fused: FusedDecodeConfig | None = None
    bwd_up: GemmConfig | None = None
    bwd_down: GemmConfig | None = None

    def __post_init__(self):
        _pow2("block_m", self.block_m, 16, 256)

    @property
    def backward(self) -> tuple[GemmConfig, GemmConfig]:
        """(dh tile, dx tile) of the backward pass."""
        return self.bwd_up or self.up, self.bwd_down or self.down

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("fused", "bwd_up", "bwd_down"):
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        keys = ("block_m", "up", "down", "fused", "bwd_up", "bwd_down")
        unknown = set(d) - set(keys)
        if unknown:
            raise ValueError(f"unknown MoEConfig keys {sorted(unknown)}; expected {', '.join(keys)}")
        fused = d.get("fused")
        opt = {k: GemmConfig(**d[k]) for k in ("bwd_up", "bwd_down") if d.get(k)}
        return cls(block_m=int(d.get("block_m", 64)), up=GemmConfig(**d.get("up", {})),
                   down=GemmConfig(**d.get("down", {})), fused=FusedDecodeConfig(**fused) if fused else None,
                   **opt)


def config_file_name(num_experts: int, ffn: int, hidden: int, device_name: str) -> str:
    return f"E={num_experts},N={ffn},K={hidden},device_name={device_name.replace(' ', '_')}.json"


def default_config(num_tokens: int, top_k: int, num_experts: int, interpreted: bool = False) -> MoEConfig:
    """A sane choice for an untuned shape or GPU, by the average rows per expert."""
    if interpreted:
        # the interpreter pays per program: few, small programs keep CPU tests fast
        return MoEConfig(16, GemmConfig(32, 32, 1, 1, 1), GemmConfig(32, 32, 1, 1, 1))
    rows = num_tokens * top_k / max(num_experts, 1)
    if num_tokens == 1:
        # the fused one-token kernels: faster on every shape measured on the H200 (session 5, run k12)
        return MoEConfig(16, GemmConfig(32, 128, 1, 4, 4), GemmConfig(32, 128, 1, 4, 4),
                         fused=FusedDecodeConfig(64, 256, 256, 8, 3))
    if rows <= 16 and num_tokens <= 64:
        # decode: weight streaming; narrow N so that every SM gets tiles
        return MoEConfig(16, GemmConfig(32, 128, 1, 4, 4), GemmConfig(32, 128, 1, 4, 4))
    if rows <= 64:
        return MoEConfig(32, GemmConfig(64, 128, 4, 4, 3), GemmConfig(64, 128, 4, 4, 3))
    if rows <= 256:
        return MoEConfig(64, GemmConfig(64, 64, 8, 4, 4), GemmConfig(128, 64, 8, 4, 4))
    return MoEConfig(128, GemmConfig(64, 64, 8, 8, 3), GemmConfig(128, 64, 8, 8, 3))


@functools.lru_cache(maxsize=64)
def load_tuned(num_experts: int, ffn: int, hidden: int, device_name: str) -> dict[int, MoEConfig] | None:
    """The tuned table for a shape and GPU, or None. Read once per process (files are data, not state)."""
    path = CONFIG_DIR / config_file_name(num_experts, ffn, hidden, device_name)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return {int(t): MoEConfig.from_dict(c) for t, c in raw.items() if not t.startswith("_")}


def pick_config(num_tokens: int, top_k: int, num_experts: int, ffn: int, hidden: int,
                device_name: str | None) -> MoEConfig:
    return _pick_config(num_tokens, top_k, num_experts, ffn, hidden, device_name,
                        os.environ.get("TRITON_INTERPRET", "0") == "1")


@functools.lru_cache(maxsize=4096)
def _pick_config(num_tokens: int, top_k: int, num_experts: int, ffn: int, hidden: int,
                 device_name: str | None, interpreted: bool) -> MoEConfig:
    # cached: a decode call is host-bound, and the choice depends on nothing else (configs are frozen)
    if not interpreted and device_name is not None:
        table = load_tuned(num_experts, ffn, hidden, device_name)
        if table:
            above = [t for t in table if t >= num_tokens]
            return table[min(above)] if above else table[max(table)]
    return default_config(num_tokens, top_k, num_experts, interpreted)
