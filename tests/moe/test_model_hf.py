"""MoEForCausalLM against transformers 5.24 on tiny random checkpoints of every supported family.

For each family a checkpoint is written by transformers itself (per-expert tensor names; DeepSeek-V3
sharded), and moeflow writes it again in the fused layout (sharded). Both must give transformers'
logits (float32, max abs difference <= 1e-4) and the same 20 greedy tokens; transformers must load
what moeflow writes. Cached decoding equals uncached decoding, and a right-padded batch equals
its rows run one by one.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from moe import MoEConfig, MoEForCausalLM, load_model, save_pretrained
from moe.layers import SparseMoEBlock

from ._hf_fixtures import FAMILIES, hf_greedy, one_thread, write_hf_checkpoint  # noqa: F401 (fixture)

ATOL = 1e-4
PROMPT = [1, 17, 42, 99, 5, 63, 150, 8, 21]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """One transformers model per family plus its checkpoint in both layouts."""
    mt = request.param
    root = tmp_path_factory.mktemp(mt)
    hf_dir, fused_dir = root / "hf_per_expert", root / "moeflow_fused"
    hf = write_hf_checkpoint(mt, hf_dir, seed=0, max_shard_size="24KB" if mt == "deepseek_v3" else None)
    ours = load_model(hf_dir)
    save_pretrained(ours, fused_dir, layout="fused", max_shard_bytes=40_000)
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        ref_logits = hf(ids).logits
    return dict(type=mt, hf=hf, hf_dir=hf_dir, fused_dir=fused_dir, ids=ids, ref_logits=ref_logits,
                model=ours, hf_per_expert=ours, moeflow_fused=load_model(fused_dir),
                ref_greedy=hf_greedy(hf, PROMPT, 20))


@torch.no_grad()
def cached_greedy(model: MoEForCausalLM, prompt: list[int], steps: int) -> list[int]:
    cache = model.new_cache(1, len(prompt) + steps)
    logits = model(torch.tensor([prompt]), cache=cache)
    out = []
    for _ in range(steps):
        nxt = int(torch.argmax(logits[0, -1]))
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache=cache)
    return out


def test_layouts_written(family):
    hf_names = json.load(open(family["hf_dir"] / "model.safetensors.index.json"))["weight_map"] \
        if (family["hf_dir"] / "model.safetensors.index.json").exists() else None
    files = os.listdir(family["fused_dir"])
    assert "model.safetensors.index.json" in files, "the fused checkpoint should be sharded"
    fused_map = json.load(open(family["fused_dir"] / "model.safetensors.index.json"))["weight_map"]
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused_map)
    assert not any(".experts.0." in k for k in fused_map)
    if family["type"] == "deepseek_v3":
        assert hf_names is not None and len(set(hf_names.values())) > 1
        assert any(".experts.0.gate_proj.weight" in k for k in hf_names)


@pytest.mark.parametrize("layout", ["hf_per_expert", "moeflow_fused"])
def test_logits_equal_transformers(family, layout):
    model = family[layout]
    with torch.no_grad():
        logits = model(family["ids"])
    assert logits.shape == family["ref_logits"].shape
    diff = (logits - family["ref_logits"]).abs().max().item()
    assert diff <= ATOL, f"{family['type']} ({layout}): max |logits - transformers| = {diff}"


@pytest.mark.parametrize("layout", ["hf_per_expert", "moeflow_fused"])
def test_greedy_20_tokens_equal_transformers(family, layout):
    model = family[layout]
    ref = family["ref_greedy"]
    assert cached_greedy(model, PROMPT, 20) == ref
    assert len(set(ref)) > 1, "degenerate reference: greedy repeats one token"


def test_transformers_loads_what_we_write(family, tmp_path):
    from transformers import AutoModelForCausalLM

    save_pretrained(family["model"], tmp_path / "per_expert", layout="per_expert")
    for d in (family["fused_dir"], tmp_path / "per_expert"):
        hf2, info = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (d, info)
        with torch.no_grad():
            diff = (hf2.eval()(family["ids"]).logits - family["ref_logits"]).abs().max().item()
        assert diff <= ATOL, (d, diff)


def test_config_round_trip(family):
    cfg = family["model"].config
    assert cfg.model_type == family["type"]
    again = MoEConfig.from_hf_dict(cfg.to_hf_dict())
    assert again == cfg
    hf_cfg = family["hf"].config
    assert cfg.num_experts == getattr(hf_cfg, "num_experts", None) or getattr(hf_cfg, "num_local_experts", None) \
        or hf_cfg.n_routed_experts


def test_cached_decoding_equals_uncached(family):
    model = family["model"]
    ids = family["ids"]
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        parts = [model(ids[:, :4], cache=cache), model(ids[:, 4:5], cache=cache), model(ids[:, 5:], cache=cache)]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5
    assert cache.lengths.tolist() == [ids.shape[1]] * 2


def test_right_padded_batch_equals_rows(family):
    model = family["model"]
    rows = [PROMPT, PROMPT[2:6], [7]]
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    valid = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for r in rows])
    with torch.no_grad():
        batch = model(ids, valid_BT=valid)
        last = model(ids, valid_BT=valid, last_only=True)
        cache = model.new_cache(len(rows), T + 4)
        prefill = model(ids, cache=cache, valid_BT=valid)
        nxt = prefill[torch.arange(len(rows)), valid.sum(1) - 1].argmax(-1)
        step = model(nxt[:, None], cache=cache)
        for b, r in enumerate(rows):
            alone = model(torch.tensor([r]))
            n = len(r)
            assert (batch[b, :n] - alone[0]).abs().max().item() <= 1e-5
            assert (prefill[b, :n] - alone[0]).abs().max().item() <= 1e-5
            assert (last[b, 0] - alone[0, -1]).abs().max().item() <= 1e-5
            alone_next = model(torch.tensor([r + [int(nxt[b])]]))[0, -1]
            assert (step[b, 0] - alone_next).abs().max().item() <= 1e-5
    assert cache.lengths.tolist() == [len(r) + 1 for r in rows]


def test_moe_blocks_and_backend(family):
    model = family["model"]
    cfg = model.config
    blocks = model.moe_blocks()
    assert [b.layer_idx for b in blocks] == cfg.moe_layers
    assert [b.moe_index for b in blocks] == list(range(len(blocks)))
    assert all(isinstance(b, SparseMoEBlock) for b in blocks)
    E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    for b in blocks:
        assert b.experts.w13.shape == (E, 2 * I, D) and b.experts.w2.shape == (E, D, I)
        ids, w, logits = b.router(torch.randn(5, D))
        assert ids.dtype == torch.int64 and w.dtype == torch.float32 and logits.shape == (5, E)
    dense = [i for i in range(cfg.num_hidden_layers) if i not in cfg.moe_layers]
    if family["type"] in ("qwen2_moe", "deepseek_v2", "deepseek_v3"):
        assert dense, "the tiny config should cover a dense layer"
    if family["type"] in ("qwen2_moe", "deepseek_v2", "deepseek_v3"):
        assert all(b.shared_experts is not None for b in blocks)
    assert all((b.shared_expert_gate is not None) == (family["type"] == "qwen2_moe") for b in blocks)
    with pytest.raises(ValueError, match="unknown expert backend 'nope'"):
        model.set_backend("nope")


@pytest.mark.parametrize("model_type,kw", [
    ("mixtral", dict(sliding_window=4)),
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=3, max_window_layers=2)),  # layer 0 only
    ("mixtral", dict(tie_word_embeddings=True)),
    ("qwen3_moe", dict(decoder_sparse_step=2, num_hidden_layers=3)),           # layers 0 and 2 dense
    ("olmoe", dict(num_key_value_heads=2, clip_qkv=None)),                    # GQA, k_norm over kv heads
    ("deepseek_v2", dict(topk_method="greedy", n_group=None, topk_group=None, q_lora_rank=None)),
    ("deepseek_v3", dict(rope_interleave=False, q_lora_rank=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
], ids=["mixtral-window", "qwen2-window", "mixtral-tied", "qwen3-sparse-step", "olmoe-gqa", "dsv2-greedy",
        "dsv3-plain-rope"])
def test_variants_equal_transformers(tmp_path, model_type, kw):
    hf = write_hf_checkpoint(model_type, tmp_path, seed=1, **kw)
    model = load_model(tmp_path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model(ids) - ref).abs().max().item() <= ATOL
        cache = model.new_cache(1, 16)
        parts = [model(ids[:, :3], cache=cache), model(ids[:, 3:7], cache=cache), model(ids[:, 7:], cache=cache)]
    assert (torch.cat(parts, 1) - ref).abs().max().item() <= ATOL


def test_to_bfloat16_keeps_rotary_float32(family):
    cfg = family["model"].config
    model = MoEForCausalLM(cfg).to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary.inv_freq, MoEForCausalLM(cfg).rotary.inv_freq)


def test_padding_rows_take_no_expert():
    """Tokens marked invalid (right padding, idle engine rows) are routed to no expert."""
    import torch

    from moe import MoEConfig, MoEForCausalLM

    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig.tiny("mixtral"))
    seen = []
    for b in model.moe_blocks():
        b.experts.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        padded = model(ids, valid_BT=valid)
        alone = model(ids[1:, :2])
    for ids_NK in seen[:len(model.moe_blocks())]:
        assert (ids_NK.view(2, 5, -1)[1, 2:] == -1).all() and (ids_NK.view(2, 5, -1)[0] >= 0).all()
    torch.testing.assert_close(padded[1, :2], alone[0], rtol=1e-5, atol=1e-5)
