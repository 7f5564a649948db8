"""Hugging Face checkpoints: load_model (safetensors, single file or sharded index) and save_pretrained.

Weights stream through safetensors memory maps, one tensor at a time, into a model built on the
meta device, so at most one full copy of the weights exists in RAM (plus one tensor in flight).
Nothing is ever unpickled: a directory with only ``pytorch_model.bin`` is refused.

Names (Hugging Face -> moeflow module), ``{i}`` = decoder layer, ``{e}`` = expert:

    model.embed_tokens.weight                     embed.weight
    model.layers.{i}.self_attn.*                  layers.{i}.attn.*
    model.layers.{i}.{input,post_attention}_layernorm.weight   (same)
    model.layers.{i}.mlp.gate.weight              layers.{i}.mlp.router.weight  (+ .e_score_correction_bias)
    model.layers.{i}.mlp.experts.gate_up_proj     layers.{i}.mlp.experts.w13 [E, 2I, D]   fused layout
    model.layers.{i}.mlp.experts.down_proj        layers.{i}.mlp.experts.w2  [E, D, I]
    model.layers.{i}.mlp.experts.{e}.gate_proj / up_proj / down_proj .weight  per-expert layout
    model.layers.{i}.block_sparse_moe.experts.{e}.w1 / w3 / w2 .weight       (Mixtral per-expert)
    model.layers.{i}.mlp.shared_expert.* (Qwen2-MoE) / shared_experts.* (DeepSeek)   layers.{i}.mlp.shared_experts.*
    model.norm.weight, lm_head.weight              norm.weight, lm_head.weight

transformers 5.24's own save_pretrained writes the per-expert layout and loads both.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import MoEConfig
from .layers import SparseMoEBlock
from .model import MoEForCausalLM

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "consolidated.00.pth")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
# per-expert tensor names, normalised to the gate/up/down naming
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.\d+\.)(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file, the tensor and the fix."""


def _normalise(name: str) -> str:
    name = name.replace(".block_sparse_moe.", ".mlp.")
    m = _PER_EXPERT.match(name)
    if m:
        name = f"{m.group(1)}{_EXPERT_PART.get(m.group(2), m.group(2))}.weight"
    return name


def _hf_name(cfg: MoEConfig, internal: str) -> str:
    """Hugging Face name of a non-expert tensor (fused naming for the MoE layer's own parts)."""
    if internal == "embed.weight":
        return "model.embed_tokens.weight"
    if internal == "norm.weight":
        return "model.norm.weight"
    if internal == "lm_head.weight":
        return internal
    name = "model." + internal
    name = name.replace(".attn.", ".self_attn.").replace(".mlp.router.", ".mlp.gate.")
    if ".mlp.shared_experts." in name and cfg.model_type == "qwen2_moe":
        name = name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
    return name


# --- locating the weights -----------------------------------------------------------------------
def _weight_files(path: str) -> tuple[dict[str, str], str]:
    """Map each stored tensor name to its file; also return a description of where they came from."""
    index_path = os.path.join(path, INDEX_NAME)
    single = os.path.join(path, SINGLE_NAME)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({e}): it must be JSON with a "
                                  "'weight_map' of tensor name -> shard file; re-save the checkpoint") from e
        files = {}
        for tensor, shard in weight_map.items():
            full = os.path.join(path, shard)
            if not os.path.exists(full):
                raise CheckpointError(f"{index_path} maps tensor {tensor!r} to shard {shard!r}, which does not "
                                      f"exist in {path}: copy the missing shard or re-save the checkpoint")
            files[tensor] = full
        return files, index_path
    if os.path.exists(single):
        return {}, single
    present = [n for n in _PICKLE_NAMES if os.path.exists(os.path.join(path, n))]
    present += sorted(n for n in os.listdir(path) if n.endswith(".bin") and n not in present)
    if present:
        raise CheckpointError(f"{path} holds only pickle weights ({', '.join(present)}); moeflow never unpickles "
                              "files (loading a pickle can run arbitrary code). Convert them to safetensors "
                              f"('{SINGLE_NAME}' or a sharded '{INDEX_NAME}'), e.g. with transformers: "
                              "model.save_pretrained(dir, safe_serialization=True) in a trusted environment")
    raise CheckpointError(f"no weights in {path}: expected {SINGLE_NAME} or {INDEX_NAME} (safetensors)")


class _Reader:
    """Safetensors files opened as private memory maps; tensors are copied straight from the map into
    their destination (no temporary copy), and the mapped pages are released after each tensor, so
    loading holds the model once plus at most one tensor's file pages."""

    def __init__(self, stack: contextlib.ExitStack, files: dict[str, str], single: str | None):
        self.maps: dict[str, mmap.mmap] = {}
        self.meta: dict[str, tuple[str, str, str, tuple[int, ...], int, int]] = {}  # name -> file, key, dtype,...
        self.where: dict[str, tuple[str, str]] = {}
        paths = sorted(set(files.values())) if single is None else [single]
        for p in paths:
            try:
                with safe_open(p, framework="pt", device="cpu"):  # validates the header against the file size
                    pass
                header, data_start = _read_header(p)
                f = stack.enter_context(open(p, "rb"))
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{p} is not a readable safetensors file ({e}): it is truncated or corrupt; "
                                      "re-download or re-save it") from e
            stack.callback(mm.close)
            self.maps[p] = mm
            for k, info in header.items():
                if k == "__metadata__" or (single is None and files.get(k) not in (None, p)):
                    continue  # the index decides which shard owns a duplicated name
                a, b = info["data_offsets"]
                self.meta[_normalise(k)] = (p, k, info["dtype"], tuple(info["shape"]), data_start + a, b - a)
                self.where[_normalise(k)] = (p, k)
        if single is None:
            for k, p in files.items():
                if _normalise(k) not in self.where:
                    raise CheckpointError(f"{INDEX_NAME} lists tensor {k!r} in {p}, but that file does not "
                                          "contain it: the index and shards disagree; re-save the checkpoint")

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][3]

    def nbytes(self, name: str) -> int:
        return self.meta[name][5]

    def st_dtype(self, name: str) -> str:
        return self.meta[name][2]

    def copy_into(self, name: str, out: torch.Tensor) -> None:
        """out.copy_(stored tensor), casting dtype and moving device as needed."""
        p, k, st_dtype, shape, start, nbytes = self.meta[name]
        if st_dtype not in _ST_DTYPES:
            raise CheckpointError(f"tensor {k!r} in {p} has dtype {st_dtype}, which moeflow cannot load; "
                                  f"convert the checkpoint to one of {sorted(_ST_DTYPES)}")
        if nbytes == 0:
            return
        mm = self.maps[p]
        view = torch.frombuffer(mm, dtype=_ST_DTYPES[st_dtype], count=nbytes // _DTYPE_BYTES[st_dtype],
                                offset=start).view(shape)
        out.copy_(view)
        del view
        # drop the file pages just read: they are clean (never written), so the kernel can re-read them
        page = mmap.PAGESIZE
        lo = start - start % page
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED, lo, start + nbytes - lo)

    def file_of(self, name: str) -> str:
        return self.where[name][0]


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


# --- load ---------------------------------------------------------------------------------------
def _set_tensor(model: nn.Module, internal: str, t: torch.Tensor) -> None:
    mod_name, _, leaf = internal.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=mod._parameters[leaf].requires_grad)
    else:
        mod._buffers[leaf] = t


def _open_config(path: str) -> tuple[dict, MoEConfig]:
    """config.json of the model directory ``path``: its raw dict and the MoEConfig, with the errors that name
    the fix."""
    if not os.path.isdir(path):
        raise CheckpointError(f"model directory {path} does not exist: pass a directory holding config.json "
                              "and model.safetensors")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"no config.json in {path}: a model directory needs the Hugging Face config.json "
                              "next to its weights (copy it from the model's original repository)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); fix or re-download it") from e
    try:
        return raw, MoEConfig.from_hf_dict(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e


def _checkpoint_dtype(raw: dict, cfg: MoEConfig, reader: _Reader) -> torch.dtype:
    """The dtype the checkpoint's weights keep: config.json's ``dtype`` / ``torch_dtype``, else the stored
    embedding's."""
    if raw.get("dtype") or raw.get("torch_dtype"):
        return cfg.torch_dtype
    emb = _normalise("model.embed_tokens.weight")
    return _ST_DTYPES.get(reader.st_dtype(emb), torch.float32) if reader.has(emb) else torch.float32


def model_skeleton(path: str | os.PathLike, dtype: torch.dtype | None = None,
                   backend: str = "torch") -> MoEForCausalLM:
    """The model load_model(path, dtype) would build, with every parameter on the meta device: its shapes and
    dtypes, no memory, nothing read but config.json and (where that names no dtype) the safetensors headers.
    What checks of the whole model need before minutes of loading (offload.apply.check_budget)."""
    path = os.fspath(path)
    raw, cfg = _open_config(path)
    if dtype is None:
        files, source = _weight_files(path)
        with contextlib.ExitStack() as stack:
            dtype = _checkpoint_dtype(raw, cfg, _Reader(stack, files, None if files else source))
    model = MoEForCausalLM(cfg, backend=backend, dtype=dtype, device="meta")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.config = cfg.replace(dtype=str(dtype).replace("torch.", ""))
    return model


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               backend: str = "torch", progress: Callable[[int, int], None] | None = None) -> MoEForCausalLM:
    """Load a Hugging Face MoE checkpoint directory (config.json + safetensors) into MoEForCausalLM.

    dtype None keeps the checkpoint's dtype (config.json ``dtype``/``torch_dtype``, else the stored
    tensors'). progress(done_bytes, total_bytes) is called after each tensor.
    """
    path = os.fspath(path)
    raw, cfg = _open_config(path)
    files, source = _weight_files(path)
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        reader = _Reader(stack, files, None if files else source)
        if dtype is None:
            dtype = _checkpoint_dtype(raw, cfg, reader)
        model = MoEForCausalLM(cfg, backend=backend, dtype=dtype, device="meta")
        _stream_weights(model, cfg, reader, dtype, device, progress)
    model.reset_rotary(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.config = cfg.replace(dtype=str(dtype).replace("torch.", ""))
    return model


def _stream_weights(model: MoEForCausalLM, cfg: MoEConfig, reader: _Reader, dtype: torch.dtype,
                    device: torch.device, progress) -> None:
    consumed: set[str] = set()
    blocks = {f"layers.{b.layer_idx}.mlp.experts.": b for b in model.moe_blocks()}
    plain = [(n, t) for n, t in list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers())
             if not n.startswith("rotary.") and not any(n.startswith(p) for p in blocks)]
    if cfg.tie_word_embeddings:
        plain = [(n, t) for n, t in plain if n != "lm_head.weight"]
        consumed.add("lm_head.weight")  # tolerated if stored anyway
    total = sum(reader.nbytes(k) for k in reader.where)
    done = 0

    def fetch(hf: str, out: torch.Tensor) -> torch.Tensor:
        """Check the stored tensor's name and shape, copy it into ``out``, report progress."""
        nonlocal done
        if not reader.has(hf):
            raise CheckpointError(f"tensor {hf!r} is missing from the checkpoint ({_files_desc(reader)}); the "
                                  f"weights do not match config.json (model_type={cfg.model_type}, "
                                  f"num_hidden_layers={cfg.num_hidden_layers}, num_experts={cfg.num_experts}): "
                                  "use the config.json that came with these weights")
        shape = reader.shape(hf)
        if shape != tuple(out.shape):
            raise CheckpointError(f"tensor {reader.where[hf][1]!r} in {reader.file_of(hf)} has shape {list(shape)} "
                                  f"but config.json implies {list(out.shape)}: the weights do not match "
                                  "config.json; use the config.json that came with these weights")
        consumed.add(hf)
        reader.copy_into(hf, out)
        done += reader.nbytes(hf)
        if progress is not None:
            progress(done, total)
        return out

    for name, ref in plain:
        hf = _hf_name(cfg, name)
        # the meta model already has each tensor's dtype (DeepSeek's router stays float32, as in transformers)
        _set_tensor(model, name, fetch(hf, torch.empty(ref.shape, dtype=ref.dtype, device=device)))

    E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    for prefix, block in blocks.items():
        hf_prefix = f"model.layers.{block.layer_idx}.mlp.experts."
        fused = hf_prefix + "gate_up_proj"
        if reader.has(fused) or reader.has(hf_prefix + "down_proj"):
            w13 = fetch(fused, torch.empty(E, 2 * I, D, dtype=dtype, device=device))
            w2 = fetch(hf_prefix + "down_proj", torch.empty(E, D, I, dtype=dtype, device=device))
        elif not reader.has(hf_prefix + "0.gate_proj.weight"):
            raise CheckpointError(f"the experts of layer {block.layer_idx} are missing from the checkpoint "
                                  f"({_files_desc(reader)}): expected {fused!r} (fused layout) or "
                                  f"'{hf_prefix}0.gate_proj.weight' / '...experts.0.w1.weight' (per-expert layout); "
                                  "use the config.json that came with these weights")
        else:
            w13 = torch.empty(E, 2 * I, D, dtype=dtype, device=device)
            w2 = torch.empty(E, D, I, dtype=dtype, device=device)
            for e in range(E):  # each expert's tensors are copied straight into its rows of w13 / w2
                fetch(f"{hf_prefix}{e}.gate_proj.weight", w13[e, :I])
                fetch(f"{hf_prefix}{e}.up_proj.weight", w13[e, I:])
                fetch(f"{hf_prefix}{e}.down_proj.weight", w2[e])
        _set_tensor(model, prefix + "w13", w13)
        _set_tensor(model, prefix + "w2", w2)

    extra = [k for k in reader.where if k not in consumed and not _ignorable(cfg, k)]
    if extra:
        k = sorted(extra)[0]
        raise CheckpointError(f"unexpected tensor {reader.where[k][1]!r} in {reader.file_of(k)} "
                              f"({len(extra)} unexpected in all): a {cfg.model_type} model with this config.json "
                              f"(num_hidden_layers={cfg.num_hidden_layers}, num_experts={cfg.num_experts}) has no "
                              "such weight; use the config.json that came with these weights, or remove the tensor")


def _ignorable(cfg: MoEConfig, name: str) -> bool:
    if name.endswith("rotary_emb.inv_freq"):  # older checkpoints store this derived buffer
        return True
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    # DeepSeek-V3's multi-token-prediction layers sit past the last decoder layer; transformers skips them too
    return bool(m and cfg.model_type == "deepseek_v3" and int(m.group(1)) >= cfg.num_hidden_layers)


def _files_desc(reader: _Reader) -> str:
    files = sorted(reader.maps)
    return files[0] if len(files) == 1 else f"{len(files)} shards in {os.path.dirname(files[0])}"


# --- save ---------------------------------------------------------------------------------------
def _hf_tensors(model: MoEForCausalLM, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    cfg = model.config
    mixtral_names = cfg.model_type == "mixtral" and layout == "per_expert"
    blocks = {f"layers.{b.layer_idx}.mlp.": b for b in model.moe_blocks()}
    for name, t in list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers()):
        if name.startswith("rotary.") or ".mlp.experts." in name:
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        hf = _hf_name(cfg, name)
        if mixtral_names:
            hf = hf.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        yield hf, t
    for prefix, block in blocks.items():
        experts = block.experts
        if not (hasattr(experts, "w13") and hasattr(experts, "w2")):
            raise ValueError(f"the experts of layer {block.layer_idx} ({type(experts).__name__}) have no w13/w2 "
                             "weights to save; save the model before replacing its experts")
        w13, w2 = experts.w13, experts.w2
        if layout == "fused":
            yield f"model.layers.{block.layer_idx}.mlp.experts.gate_up_proj", w13
            yield f"model.layers.{block.layer_idx}.mlp.experts.down_proj", w2
            continue
        I = w2.shape[2]
        base = f"model.layers.{block.layer_idx}." + ("block_sparse_moe" if mixtral_names else "mlp") + ".experts."
        names = ("w1", "w3", "w2") if mixtral_names else ("gate_proj", "up_proj", "down_proj")
        for e in range(w13.shape[0]):
            yield f"{base}{e}.{names[0]}.weight", w13[e, :I]
            yield f"{base}{e}.{names[1]}.weight", w13[e, I:]
            yield f"{base}{e}.{names[2]}.weight", w2[e]


def save_pretrained(model: MoEForCausalLM, path: str | os.PathLike, layout: str = "fused",
                    max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors weights in Hugging Face naming (transformers loads them).

    layout "fused": experts.gate_up_proj [E, 2I, D] / experts.down_proj [E, D, I];
    "per_expert": experts.{e}.gate_proj/up_proj/down_proj (Mixtral: block_sparse_moe.experts.{e}.w1/w3/w2).
    max_shard_bytes: split into model-0000k-of-0000n.safetensors + index when the weights exceed it.
    """
    if layout not in ("fused", "per_expert"):
        raise ValueError(f"layout must be 'fused' or 'per_expert', got {layout!r}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = model.config.replace(dtype=str(model.dtype).replace("torch.", ""))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2, sort_keys=True)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in _hf_tensors(model, layout):
        nb = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nb
    for stale in (SINGLE_NAME, INDEX_NAME):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    n = len(shards)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = SINGLE_NAME if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        # one shard's tensors are made contiguous at a time, so saving never doubles the whole model in RAM
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in shard}
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        del tensors
    if n > 1:
        with open(os.path.join(path, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
