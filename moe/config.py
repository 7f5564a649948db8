"""MoEConfig: one settings dataclass for every supported Hugging Face MoE family.

It is read from a Hugging Face ``config.json`` (``MoEConfig.from_pretrained(dir)`` or
``from_hf_dict(d)``) and written back with ``to_hf_dict()`` in the naming that transformers loads.
Family differences are normalised here so the model code reads one set of fields:

    experts        num_experts        <- num_local_experts (Mixtral) / num_experts (Qwen, OLMoE) /
                                         n_routed_experts (DeepSeek)
    expert size    moe_intermediate_size <- intermediate_size for Mixtral and OLMoE (no dense layers)
    q/k norm       qk_norm: "none" | "full" (OLMoE: over the whole projection) | "head" (Qwen3: per head)
    gating         scoring_func "softmax" | "sigmoid"; topk_method "greedy" | "group_limited_greedy" |
                   "noaux_tc" (DeepSeek-V3: biased selection, group top-k by the sum of the top-2)
    dense layers   is_moe_layer(i): DeepSeek first_k_dense_replace; Qwen mlp_only_layers/decoder_sparse_step
    attention      MLA (DeepSeek) when kv_lora_rank is set, else grouped-query attention
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
}
# transformers' per-family defaults for keys a config.json may leave out
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(rope_theta=1e6, rms_norm_eps=1e-5, norm_topk_prob=True, max_position_embeddings=4096 * 32,
                    bos_token_id=1, eos_token_id=2, num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(rope_theta=10000.0, rms_norm_eps=1e-6, norm_topk_prob=False, qkv_bias=True,
                      max_position_embeddings=32768, num_experts=60, num_experts_per_tok=4),
    "qwen3_moe": dict(rope_theta=10000.0, rms_norm_eps=1e-6, norm_topk_prob=False, qk_norm="head",
                      max_position_embeddings=32768, num_experts=128, num_experts_per_tok=8),
    "olmoe": dict(rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False, qk_norm="full",
                  max_position_embeddings=4096, pad_token_id=1, eos_token_id=50279, num_experts=64,
                  num_experts_per_tok=8),
    "deepseek_v2": dict(rope_theta=10000.0, rms_norm_eps=1e-6, norm_topk_prob=False, topk_method="greedy",
                        scoring_func="softmax", routed_scaling_factor=1.0, n_shared_experts=2,
                        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, num_experts=64,
                        kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, rope_interleave=True),
    "deepseek_v3": dict(rope_theta=10000.0, rms_norm_eps=1e-6, norm_topk_prob=True, topk_method="noaux_tc",
                        scoring_func="sigmoid", routed_scaling_factor=2.5, n_shared_experts=1, n_group=8,
                        topk_group=4, first_k_dense_replace=3, max_position_embeddings=4096, bos_token_id=0,
                        eos_token_id=1, num_experts=256, num_experts_per_tok=8, kv_lora_rank=512,
                        q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        rope_interleave=True),
}
_EXPERT_ALIASES = ("num_experts", "num_local_experts", "n_routed_experts")
_ROPE_TYPES = ("default", "linear", "yarn")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MoEConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int | None = None          # dense MLP layers; None -> moe_intermediate_size
    num_key_value_heads: int | None = None         # None -> num_attention_heads
    head_dim: int | None = None                    # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hidden_act: str = "silu"
    dtype: str = "float32"
    # attention
    qkv_bias: bool = False                          # bias on q/k/v projections (Qwen2-MoE; attention_bias)
    o_bias: bool = False                            # bias on the output projection (attention_bias)
    qk_norm: str = "none"                           # "none" | "full" | "head"
    clip_qkv: float | None = None                   # OLMoE
    sliding_window: int | None = None
    layer_types: list[str] | None = None            # per layer "full_attention" | "sliding_attention"
    # MLA (DeepSeek)
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = False
    # routing
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    norm_topk_prob: bool = False
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    # dense layers and shared experts
    first_k_dense_replace: int = 0
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1
    shared_expert_intermediate_size: int | None = None   # Qwen2-MoE shared expert (with sigmoid gate)
    n_shared_experts: int | None = None                  # DeepSeek shared experts (n * moe_intermediate_size)
    # keys of the source config.json that moeflow does not use, written back unchanged
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unknown model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                     "num_experts_per_tok", "moe_intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_experts "
                             f"({self.num_experts})")
        if self.intermediate_size is None:
            self.intermediate_size = self.moe_intermediate_size
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if not self.is_mla:
            if self.head_dim is None:
                if self.hidden_size % self.num_attention_heads:
                    raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                                     f"({self.num_attention_heads}), or set head_dim")
                self.head_dim = self.hidden_size // self.num_attention_heads
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                                 f"num_key_value_heads ({self.num_key_value_heads})")
        else:
            for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                    raise ValueError(f"MLA attention (kv_lora_rank={self.kv_lora_rank}) needs a positive {name}, "
                                     f"got {getattr(self, name)!r}")
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; moeflow's experts are SwiGLU ('silu')")
        if self.qk_norm not in ("none", "full", "head"):
            raise ValueError(f"qk_norm must be 'none', 'full' or 'head', got {self.qk_norm!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; choose one of {tuple(_DTYPES)}")
        self._check_rope()
        self._check_routing()
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                             f"{self.num_hidden_layers}")
        if self.decoder_sparse_step <= 0:
            raise ValueError(f"decoder_sparse_step must be positive, got {self.decoder_sparse_step}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace ({self.first_k_dense_replace}) must be in "
                             f"[0, num_hidden_layers={self.num_hidden_layers}]")

    def _check_rope(self) -> None:
        rp = dict(self.rope_parameters or {})
        rp.setdefault("rope_type", rp.pop("type", "default"))
        rp.setdefault("rope_theta", 10000.0)
        if rp["rope_type"] not in _ROPE_TYPES:
            raise ValueError(f"rope_type {rp['rope_type']!r} is not supported; supported: {_ROPE_TYPES}")
        if rp["rope_type"] == "linear" and not rp.get("factor"):
            raise ValueError("rope_parameters of type 'linear' need a 'factor' (e.g. {'factor': 2.0})")
        if rp["rope_type"] == "yarn":
            rp.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        self.rope_parameters = rp

    def _check_routing(self) -> None:
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {self.scoring_func!r}")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"topk_method must be 'greedy', 'group_limited_greedy' or 'noaux_tc', "
                             f"got {self.topk_method!r}")
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            if not self.n_group or not self.topk_group:
                raise ValueError(f"topk_method {self.topk_method!r} needs n_group and topk_group, got "
                                 f"n_group={self.n_group}, topk_group={self.topk_group}")
            if self.num_experts % self.n_group:
                raise ValueError(f"num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
            if not 0 < self.topk_group <= self.n_group:
                raise ValueError(f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")
            if self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
                raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the "
                                 f"{self.topk_group} chosen groups")
            if self.topk_method == "noaux_tc" and self.num_experts // self.n_group < 2:
                raise ValueError("noaux_tc scores a group by the sum of its top-2 experts: each group needs >= 2 "
                                 f"experts, got num_experts={self.num_experts}, n_group={self.n_group}")

    # --- derived -------------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        if self.model_type in ("deepseek_v2", "deepseek_v3"):
            return i >= self.first_k_dense_replace
        if self.model_type in ("qwen2_moe", "qwen3_moe"):
            return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
        return True

    def layer_window(self, i: int) -> int | None:
        """Sliding-window size of layer i's attention, None for full attention."""
        if not self.sliding_window:
            return None
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        return self.sliding_window

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # --- Hugging Face config.json ---------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MoEConfig":
        cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else str(path)
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"no config.json at {cfg_path}: a model directory needs the Hugging Face "
                                    "config.json next to its weights")
        with open(cfg_path) as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def from_hf_dict(cls, d: dict) -> "MoEConfig":
        d = dict(d)
        mt = d.pop("model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unknown model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        defaults = _FAMILY_DEFAULTS[mt]
        used: set[str] = {"architectures", "transformers_version", "torch_dtype", "dtype"}

        def get(key, default=None):
            used.add(key)
            return d[key] if key in d else defaults.get(key, default)

        experts = next((d[k] for k in _EXPERT_ALIASES if d.get(k) is not None), defaults.get("num_experts"))
        used.update(_EXPERT_ALIASES)
        if mt in ("mixtral", "olmoe"):
            moe_i = get("intermediate_size")
            dense_i = None
        else:
            moe_i = get("moe_intermediate_size")
            dense_i = get("intermediate_size")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        used.update(("rope_parameters", "rope_scaling", "rope_theta"))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope.setdefault("rope_theta", d.get("rope_theta") or defaults["rope_theta"])
        attention_bias = bool(get("attention_bias", False))
        is_ds = mt.startswith("deepseek")
        sliding = None
        if mt == "mixtral":
            sliding = get("sliding_window")
        elif mt in ("qwen2_moe", "qwen3_moe"):
            sliding = get("sliding_window") if get("use_sliding_window", False) else None
            used.update(("max_window_layers", "sliding_window", "use_sliding_window"))
        layer_types = get("layer_types") if sliding else None
        used.add("layer_types")
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        kw = dict(
            model_type=mt, vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
            num_hidden_layers=get("num_hidden_layers"), num_attention_heads=get("num_attention_heads"),
            num_experts=experts, num_experts_per_tok=get("num_experts_per_tok"),
            moe_intermediate_size=moe_i, intermediate_size=dense_i,
            num_key_value_heads=get("num_key_value_heads"),
            head_dim=None if is_ds else get("head_dim"),
            rms_norm_eps=get("rms_norm_eps"), max_position_embeddings=get("max_position_embeddings"),
            rope_parameters=rope, tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"), pad_token_id=get("pad_token_id"),
            hidden_act=get("hidden_act", "silu"), dtype=str(dtype).replace("torch.", ""),
            qkv_bias=bool(get("qkv_bias", False)) or (attention_bias and not is_ds),
            o_bias=attention_bias, qk_norm=defaults.get("qk_norm", "none"),
            clip_qkv=get("clip_qkv") if mt == "olmoe" else None,
            sliding_window=sliding, layer_types=layer_types,
            norm_topk_prob=bool(get("norm_topk_prob")),
            first_k_dense_replace=int(get("first_k_dense_replace", 0) or 0),
            mlp_only_layers=list(get("mlp_only_layers", []) or []),
            decoder_sparse_step=int(get("decoder_sparse_step", 1) or 1),
        )
        if mt == "qwen2_moe":
            kw["shared_expert_intermediate_size"] = get("shared_expert_intermediate_size")
        if is_ds:
            kw.update(q_lora_rank=d.get("q_lora_rank") if "q_lora_rank" in d else defaults["q_lora_rank"],
                      kv_lora_rank=get("kv_lora_rank"), qk_nope_head_dim=get("qk_nope_head_dim"),
                      qk_rope_head_dim=get("qk_rope_head_dim"), v_head_dim=get("v_head_dim"),
                      # transformers' DeepSeek-V2 always rotates interleaved pairs (complex form)
                      rope_interleave=True if mt == "deepseek_v2" else bool(get("rope_interleave")),
                      scoring_func=get("scoring_func"), topk_method=get("topk_method"),
                      n_group=get("n_group"), topk_group=get("topk_group"),
                      routed_scaling_factor=float(get("routed_scaling_factor")),
                      n_shared_experts=get("n_shared_experts"))
            used.update(("q_lora_rank", "qk_head_dim"))
        kw["extra"] = {k: v for k, v in d.items() if k not in used}
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        """A config.json dict transformers loads (its own naming for this family)."""
        mt = self.model_type
        d: dict[str, Any] = dict(self.extra)
        d.update(
            architectures=[_ARCHITECTURES[mt]], model_type=mt, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            num_experts_per_tok=self.num_experts_per_tok, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, rope_parameters=dict(self.rope_parameters),
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, hidden_act=self.hidden_act,
            dtype=self.dtype,
        )
        if mt == "mixtral":
            d.update(num_local_experts=self.num_experts, intermediate_size=self.moe_intermediate_size,
                     head_dim=self.head_dim, sliding_window=self.sliding_window)
        elif mt == "olmoe":
            d.update(num_experts=self.num_experts, intermediate_size=self.moe_intermediate_size,
                     norm_topk_prob=self.norm_topk_prob, attention_bias=self.o_bias, clip_qkv=self.clip_qkv)
            if self.head_dim != self.hidden_size // self.num_attention_heads:
                d["head_dim"] = self.head_dim
        elif mt in ("qwen2_moe", "qwen3_moe"):
            d.update(num_experts=self.num_experts, moe_intermediate_size=self.moe_intermediate_size,
                     intermediate_size=self.intermediate_size, norm_topk_prob=self.norm_topk_prob,
                     decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers),
                     use_sliding_window=bool(self.sliding_window), sliding_window=self.sliding_window)
            if self.layer_types is not None:
                d["layer_types"] = list(self.layer_types)
            if mt == "qwen2_moe":
                d.update(shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                         qkv_bias=self.qkv_bias)
                if self.head_dim != self.hidden_size // self.num_attention_heads:
                    d["head_dim"] = self.head_dim
            else:
                d.update(attention_bias=self.o_bias, head_dim=self.head_dim)
        else:
            d.update(n_routed_experts=self.num_experts, moe_intermediate_size=self.moe_intermediate_size,
                     intermediate_size=self.intermediate_size, n_shared_experts=self.n_shared_experts,
                     first_k_dense_replace=self.first_k_dense_replace, n_group=self.n_group,
                     topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
                     norm_topk_prob=self.norm_topk_prob, q_lora_rank=self.q_lora_rank,
                     kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
                     qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
                     attention_bias=self.o_bias, topk_method=self.topk_method, scoring_func=self.scoring_func)
            if mt == "deepseek_v3":
                d["rope_interleave"] = self.rope_interleave
        return d

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    # --- presets -----------------------------------------------------------------------------
    @classmethod
    def tiny(cls, model_type: str = "mixtral", **overrides) -> "MoEConfig":
        """A few-kilobyte model of the given family, for tests (2-3 layers, hidden 32, 8 experts)."""
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unknown model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        kw: dict[str, Any] = dict(model_type=model_type, vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                  num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=48,
                                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
        d = _FAMILY_DEFAULTS[model_type]
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": d["rope_theta"]}
        kw["rms_norm_eps"] = d["rms_norm_eps"]
        kw["norm_topk_prob"] = d["norm_topk_prob"]
        if model_type in ("mixtral", "olmoe"):
            kw["intermediate_size"] = 16
        if model_type == "qwen2_moe":
            kw.update(shared_expert_intermediate_size=24, qkv_bias=True)
        if model_type == "qwen3_moe":
            kw.update(qk_norm="head", head_dim=16)
        if model_type == "olmoe":
            kw.update(qk_norm="full")
        if model_type.startswith("deepseek"):
            kw.update(num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, first_k_dense_replace=1,
                      n_shared_experts=1, rope_interleave=True, scoring_func=d["scoring_func"],
                      routed_scaling_factor=d["routed_scaling_factor"])
            if model_type == "deepseek_v2":
                kw.update(topk_method="group_limited_greedy", n_group=4, topk_group=2)
            else:
                kw.update(topk_method="noaux_tc", n_group=4, topk_group=2)
        kw.update(overrides)
        return cls(**kw)
