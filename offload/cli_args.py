"""Command-line options of offloading, for `moe generate` (and any command that loads a model).

    from offload.cli_args import add_offload_args, apply_from_args
    add_offload_args(parser)                 # --gpu-memory 24GiB --offload-policy lru ...
    model = apply_from_args(model, args)     # no-op unless --gpu-memory was given

The hub (moe/cli.py) calls these; offloading stays a step applied to a loaded model.
"""
from __future__ import annotations

import argparse
import os

from .config import POLICIES, PREFETCH, OffloadConfig


def _pack_choice(v: str):
    """--offload-pack-experts' value: on -> True, off -> False, auto -> 'auto' (OffloadConfig.pack_experts)."""
    got = {"on": True, "off": False, "auto": "auto"}.get(v.lower())
    if got is None:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {v!r}")
    return got


def add_offload_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("expert offloading")
    g.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="offload experts to host memory, keeping the device within SIZE ('24GiB', or a fraction "
                        "such as 0.3 of the device's memory); off when not given")
    g.add_argument("--offload-policy", default="lfu", choices=[p for p in POLICIES if p != "belady"],
                   help="eviction policy of the GPU expert cache (default lfu, counts with a half-life; predictor "
                        "needs --offload-predictor)")
    g.add_argument("--offload-lfu-half-life", type=float, default=None, metavar="STEPS",
                   help="with --offload-policy lfu: use counts halve over this many steps, so recent requests "
                        "count more (default 23, which did best on a trained model's routing; inf: counted over "
                        "the whole run)")
    g.add_argument("--offload-prefetch", default="none",
                   choices=list(PREFETCH),
                   help="prefetch the next layer's experts, guessed by: its router on the current hidden state "
                        "(next_layer_gate), a fitted probe on it (probe; needs --offload-probes), each prefetching "
                        "every token's likeliest half of its top-k guesses; its own attention on the current "
                        "residual, then its router (attention: one more attention a layer, the best one-ahead guess "
                        "measured, BENCHMARKS 7m/7n; all top-k guesses prefetched); or the routing-path predictor "
                        "(predictor; needs --offload-predictor)")
    g.add_argument("--offload-predictor", default=None, metavar="FILE",
                   help="a routing-path predictor trained on this model's routing trace (the P.npz of `moe predictor "
                        "train`; its P.probe.npz beside it, when there, becomes its lookahead), for "
                        "--offload-policy predictor and --offload-prefetch predictor")
    g.add_argument("--offload-prefetch-budget", type=float, default=None, metavar="N",
                   help="expert copies per layer the predictor's prefetch may queue behind demand copies (about "
                        "what the copy engine moves during one layer; default: only while it is idle)")
    g.add_argument("--offload-probes", default=None, metavar="FILE",
                   help="probes fitted on this model's recorded hidden states (the P.probe.npz that `moe predictor "
                        "train --features` writes), for --offload-prefetch probe")
    g.add_argument("--cpu-fallback", action="store_true",
                   help="compute missed experts on the CPU when that is cheaper than copying them (Fiddler)")
    g.add_argument("--expert-slices", type=int, default=1, metavar="G",
                   help="cache and move experts in G slices of their ffn dimension; with --cpu-fallback one "
                        "missed expert is then shared between a copy and the CPU (default 1: whole experts)")
    g.add_argument("--offload-pack-experts", nargs="?", type=_pack_choice, const=True, default="auto",
                   metavar="{auto,on,off}",
                   help="keep bfloat16 experts in host memory packed to 12 bits a weight, losslessly: each copy "
                        "moves a quarter fewer bytes and is decoded on the GPU. auto (the default): on a GPU for "
                        "experts of 10 MiB or more (copy-bound), 8 MiB with --offload-driver device; the flag "
                        "alone: on")
    g.add_argument("--offload-driver", default="auto", choices=["auto", "host", "device"],
                   help="who decides hits, misses and evictions: host (every policy, prefetch and the CPU "
                        "fallback) or device (the GPU decides itself and reads missed experts from host memory "
                        "with a kernel: no host sync, a decode step is one CUDA graph; lru / lfu only; Qwen3 shapes "
                        "at 25%%: 0.74-0.78x the host path's step at 1-4 rows, BENCHMARKS 3q). auto (the default): "
                        "device on a GPU with --backend triton for experts up to 64 MiB whose step's top-k fit the "
                        "slots in one round (or that only it packs), else host (copy-bound steps, where the copy "
                        "engine is faster)")
    g.add_argument("--offload-reserve", default="256MiB", metavar="SIZE",
                   help="of --gpu-memory, what is kept free for activations and the kernels' working memory, "
                        "besides the dense weights and the KV cache (default 256MiB); the expert cache gets the rest")
    g.add_argument("--offload-from-disk", action="store_true",
                   help="read experts from the checkpoint's memory-mapped safetensors instead of host memory")


def apply_from_args(model, args: argparse.Namespace, checkpoint: str | None = None, batch_size: int = 1,
                    max_len: int = 0):
    """apply_offload with the options of add_offload_args; returns the model unchanged without --gpu-memory.

    checkpoint: the model directory (disk tier, and 'auto' picking it when host RAM is short).
    batch_size, max_len: the KV cache the engine will make, counted in the budget before experts (and
    batch_size the rows of a decode step, OffloadConfig.decode_batch).
    """
    kv = 0
    if max_len and getattr(args, "gpu_memory", None) is not None and hasattr(getattr(model, "config", None),
                                                                           "num_hidden_layers"):
        from .apply import kv_cache_bytes
        kv = kv_cache_bytes(model.config, batch_size, max_len, next(model.parameters()).dtype)
    cfg = offload_config_from_args(args, checkpoint, batch_size, kv)
    if cfg is None:
        return model
    from .apply import apply_offload
    return apply_offload(model, cfg)


def offload_config_from_args(args: argparse.Namespace, checkpoint: str | None = None, batch_size: int = 1,
                     kv_cache_bytes: int = 0) -> OffloadConfig | None:
    """The OffloadConfig the options of add_offload_args describe (None without --gpu-memory), with every check
    that needs no model: `moe generate` calls it before the weights load, so a wrong flag or a missing or broken
    probes / predictor file fails at once, not after minutes of loading."""
    if getattr(args, "gpu_memory", None) is None:
        given = ["--" + name.replace("_", "-") for name in settings_given(args)]
        if given:
            raise ValueError(f"{' '.join(given)} configure expert offloading, which --gpu-memory turns on: add "
                             "--gpu-memory SIZE (e.g. 24GiB) or drop them")
        return None
    disk = bool(getattr(args, "offload_from_disk", False))
    if disk and checkpoint is None:
        raise ValueError("--offload-from-disk needs the model directory (pass checkpoint=<dir> to apply_from_args)")
    device = getattr(args, "device", None)
    device = None if device in (None, "auto") else str(device)
    probes_file = getattr(args, "offload_probes", None)
    check_files(args.offload_policy, args.offload_prefetch, probes_file, getattr(args, "offload_predictor", None))
    objects = offload_objects(probes_file, getattr(args, "offload_predictor", None))
    return OffloadConfig(gpu_memory=args.gpu_memory, device=device, policy=args.offload_policy,
                         prefetch=args.offload_prefetch, **objects,
                         prefetch_budget=getattr(args, "offload_prefetch_budget", None), kv_cache_bytes=kv_cache_bytes,
                         reserve_bytes=getattr(args, "offload_reserve", SETTING_DEFAULTS["offload_reserve"]),
                         cpu_fallback=args.cpu_fallback, checkpoint=checkpoint,
                         expert_slices=getattr(args, "expert_slices", 1),
                         lfu_half_life=getattr(args, "offload_lfu_half_life", None),
                         pack_experts=getattr(args, "offload_pack_experts", "auto"),
                         driver=getattr(args, "offload_driver", "auto"), decode_batch=max(1, int(batch_size)),
                         store="disk" if disk else ("auto" if checkpoint else "memory"))


# the offload settings of `moe generate` / `moe serve` (argparse dests = ServeConfig fields) and their
# defaults: any other value configures the expert cache, which needs gpu_memory
SETTING_DEFAULTS = {"offload_policy": "lfu", "offload_prefetch": "none", "offload_probes": None,
                    "offload_predictor": None, "offload_prefetch_budget": None, "cpu_fallback": False,
                    "expert_slices": 1, "offload_from_disk": False, "offload_lfu_half_life": None,
                    "offload_pack_experts": "auto", "offload_driver": "auto", "offload_reserve": "256MiB"}


def settings_given(obj) -> list[str]:
    """The names of SETTING_DEFAULTS that ``obj`` (an argparse namespace, a ServeConfig) sets otherwise."""
    return [name for name, default in SETTING_DEFAULTS.items() if getattr(obj, name, default) != default]


def check_files(policy: str, prefetch: str, probes_file: str | None, predictor_file: str | None) -> None:
    """The file options go with the modes that use them, and those modes need them."""
    if (prefetch == "probe") != (probes_file is not None):
        raise ValueError("--offload-prefetch probe and --offload-probes FILE go together (the probes to apply, "
                         "from `moe predictor train --features`)")
    if (policy == "predictor" or prefetch == "predictor") != (predictor_file is not None):
        raise ValueError("--offload-predictor FILE goes with --offload-policy predictor and/or --offload-prefetch "
                         "predictor (the predictor to drive them, from `moe predictor train`)")


def offload_objects(probes_file: str | None = None, predictor_file: str | None = None) -> dict:
    """OffloadConfig's ``probes`` and ``predictor`` loaded from their files (the PathPredictor with the
    P.probe.npz saved beside it, when there, as its lookahead); only the keys of files given."""
    out = {}
    for what, f, made_by in (("probes", probes_file, "moe predictor train --features"),
                             ("predictor", predictor_file, "moe predictor train")):
        if f is not None and not os.path.isfile(f):
            raise ValueError(f"the {what} file {f} is not found (it comes from `{made_by}`)")
    if probes_file is not None:
        from routing.probe import ProbeLookahead
        out["probes"] = ProbeLookahead.load(probes_file)
    if predictor_file is not None:
        from routing.cli import load_predictor
        out["predictor"] = load_predictor(predictor_file)
    return out
