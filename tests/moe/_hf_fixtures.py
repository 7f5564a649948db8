"""Tiny Hugging Face MoE checkpoints written by transformers itself, for tests.

    model = build_hf_model("deepseek_v3", seed=0)            # a transformers model, random weights
    model.save_pretrained(dir)                                 # or write_hf_checkpoint(family, dir)

Weights are re-drawn at a realistic scale (std 1/sqrt(fan_in), norms near 1, a non-zero DeepSeek-V3
correction bias), so logits are far from uniform and routing and greedy decoding are decisive.
Other helpers may import these functions; nothing here downloads anything.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread. With two, thread hand-offs on a busy machine cost ~70x in wall time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hf_config(model_type: str, **overrides):
    """A transformers config of the family: 2-3 layers, hidden 32, vocab 160, 6-8 experts."""
    import transformers as tf

    common = dict(vocab_size=160, hidden_size=32, num_attention_heads=4, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if model_type == "mixtral":
        kw = dict(common, intermediate_size=24, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=6,
                  num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cls = tf.MixtralConfig
    elif model_type == "qwen2_moe":
        # layer 1 is dense (mlp_only_layers); linear rope scaling
        kw = dict(common, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                  num_hidden_layers=3, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=False, mlp_only_layers=[1],
                  rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
        cls = tf.Qwen2MoeConfig
    elif model_type == "qwen3_moe":
        kw = dict(common, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2,
                  head_dim=16, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        cls = tf.Qwen3MoeConfig
    elif model_type == "olmoe":
        kw = dict(common, intermediate_size=16, num_hidden_layers=2, num_key_value_heads=4, num_experts=8,
                  num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=3.0,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cls = tf.OlmoeConfig
    elif model_type == "deepseek_v2":
        kw = dict(common, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_key_value_heads=4,
                  n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
                  topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
                  q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cls = tf.DeepseekV2Config
    elif model_type == "deepseek_v3":
        kw = dict(common, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_key_value_heads=4,
                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                  n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                  q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                  rope_interleave=True,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                                   "mscale_all_dim": 1.0, "original_max_position_embeddings": 32,
                                   "beta_fast": 32, "beta_slow": 1})
        cls = tf.DeepseekV3Config
    else:
        raise ValueError(f"unknown family {model_type!r}; choose one of {FAMILIES}")
    kw.update(overrides)
    return cls(**kw)


@torch.no_grad()
def randomize_(model, seed: int = 0) -> None:
    """Re-draw every weight at a realistic scale (deterministic in seed)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.dim() == 1:
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.2 * torch.randn(b.shape, generator=g))


def build_hf_model(model_type: str, seed: int = 0, **overrides):
    """A transformers CausalLM of the family with random weights, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def write_hf_checkpoint(model_type: str, path, seed: int = 0, max_shard_size=None, **overrides):
    """Write a tiny checkpoint with transformers' own save_pretrained; returns the transformers model."""
    model = build_hf_model(model_type, seed, **overrides)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kw)
    return model


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], steps: int) -> list[int]:
    """Greedy continuation by transformers' forward over the whole sequence at each step (no cache)."""
    ids = list(prompt_ids)
    out = []
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1]
        nxt = int(torch.argmax(logits))
        ids.append(nxt)
        out.append(nxt)
    return out
