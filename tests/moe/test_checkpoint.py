"""load_model / save_pretrained: round trips, dtype, progress, and every refused input with its message."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe import CheckpointError, MoEConfig, MoEForCausalLM, load_model, save_pretrained

from ._hf_fixtures import one_thread  # noqa: F401 (fixture)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def _model(model_type="mixtral", **kw) -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(MoEConfig.tiny(model_type, **kw))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Mixtral written once in the per-expert layout; tests copy what they break."""
    d = tmp_path_factory.mktemp("ckpt") / "mixtral"
    model = _model()
    save_pretrained(model, d, layout="per_expert")
    return model, d


def _copy(src, dst):
    os.makedirs(dst)
    for n in os.listdir(src):
        with open(os.path.join(src, n), "rb") as f, open(os.path.join(dst, n), "wb") as g:
            g.write(f.read())
    return dst


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same(a: MoEForCausalLM, b: MoEForCausalLM):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_round_trip(tmp_path, model_type, layout):
    model = _model(model_type)
    save_pretrained(model, tmp_path, layout=layout, max_shard_bytes=30_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    loaded = load_model(tmp_path)
    _same(model, loaded)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_mixtral_names_per_layout(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "p", layout="per_expert")
    save_pretrained(model, tmp_path / "f", layout="fused")
    p = _tensors(tmp_path / "p" / "model.safetensors")
    f = _tensors(tmp_path / "f" / "model.safetensors")
    assert p["model.layers.0.block_sparse_moe.experts.3.w1.weight"].shape == (16, 32)
    assert "model.layers.0.block_sparse_moe.gate.weight" in p
    assert f["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 32, 32)
    assert f["model.layers.0.mlp.experts.down_proj"].shape == (8, 32, 16)
    w13 = model.layers[0].mlp.experts.w13
    assert torch.equal(p["model.layers.0.block_sparse_moe.experts.3.w3.weight"], w13[3, 16:])


def test_mixtral_with_gate_up_down_names(saved, tmp_path):
    # some Mixtral-style checkpoints name the per-expert weights gate_proj/up_proj/down_proj under mlp.
    model, d = saved
    t = _tensors(d / "model.safetensors")
    renamed = {}
    for k, v in t.items():
        k = k.replace(".block_sparse_moe.", ".mlp.")
        for a, b in ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")):
            k = k.replace(a, b)
        renamed[k] = v
    out = _copy(d, tmp_path / "renamed")
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    _same(model, load_model(out))


def test_dtype_and_progress(saved):
    model, d = saved
    calls = []
    m16 = load_model(d, dtype=torch.bfloat16, progress=lambda done, total: calls.append((done, total)))
    assert m16.dtype == torch.bfloat16 and m16.config.dtype == "bfloat16"
    assert m16.layers[0].mlp.experts.w13.dtype == torch.bfloat16
    assert calls and calls[-1][0] == calls[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    m32 = load_model(d)  # dtype None: the config's dtype
    assert m32.dtype == torch.float32


def test_deepseek_router_stays_float32(tmp_path):
    save_pretrained(_model("deepseek_v3").to(torch.bfloat16), tmp_path)
    m = load_model(tmp_path)
    assert m.dtype == torch.bfloat16
    r = m.moe_blocks()[0].router
    assert r.weight.dtype == torch.float32 and r.e_score_correction_bias.dtype == torch.float32


def test_tied_embeddings(tmp_path):
    model = _model("qwen3_moe", tie_word_embeddings=True)
    save_pretrained(model, tmp_path)
    assert "lm_head.weight" not in _tensors(tmp_path / "model.safetensors")
    m = load_model(tmp_path)
    assert m.lm_head.weight is m.embed.weight
    _same(model, m)


@pytest.mark.parametrize("model_type,kw", [("mixtral", {}), ("deepseek_v3", {}),
                                           ("qwen3_moe", {"tie_word_embeddings": True})])
def test_model_skeleton_has_the_loaded_models_parameters_on_meta(tmp_path, model_type, kw):
    """model_skeleton: what load_model builds (every parameter's name, shape and dtype, the tied head, the config's
    dtype), on the meta device, from config.json and the headers alone; its buffers count the same bytes."""
    from moe.checkpoint import model_skeleton
    save_pretrained(_model(model_type, **kw).to(torch.bfloat16), tmp_path)
    for dtype in (None, torch.float32):
        real, sk = load_model(tmp_path, dtype=dtype), model_skeleton(tmp_path, dtype)
        want = {n: (p.shape, p.dtype) for n, p in real.named_parameters()}
        assert {n: (p.shape, p.dtype) for n, p in sk.named_parameters()} == want
        assert all(p.is_meta for p in sk.parameters()) and sk.config.dtype == real.config.dtype
        assert (sk.lm_head.weight is sk.embed.weight) == bool(kw)
        nb = lambda m: sum(b.numel() * b.element_size() for b in m.buffers())  # noqa: E731
        assert nb(sk) == nb(real)
    with pytest.raises(CheckpointError, match="does not exist"):
        model_skeleton(tmp_path / "nowhere")


# --- refused inputs -------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "m")
    os.remove(d / "config.json")
    with pytest.raises(CheckpointError, match=r"no config.json in .*m: a model directory needs"):
        load_model(d)


def test_unknown_model_type(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "m")
    cfg = json.load(open(d / "config.json"))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"config.json: unknown model_type 'llama'; supported: mixtral, "
                                              r"qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3"):
        load_model(d)


class _Boom:
    """Unpickling this creates a marker file: proof that nothing was unpickled if it is absent."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_weights_refused_never_unpickled(saved, tmp_path):
    d = tmp_path / "m"
    os.makedirs(d)
    with open(saved[1] / "config.json") as f, open(d / "config.json", "w") as g:
        g.write(f.read())
    marker = tmp_path / "UNPICKLED"
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Boom(str(marker)), f)
    with pytest.raises(CheckpointError, match=r"holds only pickle weights \(pytorch_model.bin\); moeflow never "
                                              r"unpickles.*Convert them to safetensors"):
        load_model(d)
    assert not marker.exists()


def test_no_weights(saved, tmp_path):
    d = tmp_path / "m"
    os.makedirs(d)
    with open(saved[1] / "config.json") as f, open(d / "config.json", "w") as g:
        g.write(f.read())
    with pytest.raises(CheckpointError, match="no weights in .*expected model.safetensors"):
        load_model(d)


def test_truncated_file(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "m")
    data = open(d / "model.safetensors", "rb").read()
    open(d / "model.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file .*truncated or "
                                              r"corrupt; re-download or re-save it"):
        load_model(d)


def test_corrupt_header(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "m")
    open(d / "model.safetensors", "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_model(d)


def test_index_points_at_missing_shard(tmp_path):
    save_pretrained(_model(), tmp_path, max_shard_bytes=30_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=rf"maps tensor '.*' to shard '{shard}', which does not exist"):
        load_model(tmp_path)


def _drop(*names):
    return lambda t: {k: v for k, v in t.items() if k not in names}


# (how the stored tensors are edited, the message expected)
_TENSOR_EDITS = {
    "missing_tensor": (_drop("model.layers.1.self_attn.k_proj.weight"),
                       r"tensor 'model.layers.1.self_attn.k_proj.weight' is missing from the checkpoint "
                       r"\(.*model.safetensors\).*use the config.json"),
    "missing_expert": (_drop("model.layers.0.block_sparse_moe.experts.5.w3.weight"),
                       r"tensor 'model.layers.0.mlp.experts.5.up_proj.weight' is missing"),
    "missing_layer_experts": (lambda t: {k: v for k, v in t.items() if ".layers.1.block_sparse_moe.experts." not in k},
                              r"experts of layer 1 are missing.*gate_up_proj.*per-expert layout"),
    "unexpected_tensor": (lambda t: {**t, "model.layers.7.self_attn.q_proj.weight": torch.zeros(32, 32)},
                          r"unexpected tensor 'model.layers.7.self_attn.q_proj.weight' in .*model.safetensors "
                          r".*has no such weight"),
    "wrong_shape": (lambda t: {**t, "model.norm.weight": torch.ones(31)},
                    r"tensor 'model.norm.weight' in .*model.safetensors has shape \[31\] but config.json "
                    r"implies \[32\]"),
}


@pytest.mark.parametrize("case", list(_TENSOR_EDITS))
def test_bad_tensors(saved, tmp_path, case):
    edit, message = _TENSOR_EDITS[case]
    d = _copy(saved[1], tmp_path / "m")
    save_file(edit(_tensors(d / "model.safetensors")), str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        load_model(d)


def test_wrong_expert_count_in_config(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "m")
    cfg = json.load(open(d / "config.json"))
    cfg["num_local_experts"] = 4
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.block_sparse_moe.gate.weight' in .* has shape \[8, 32\] but "
                                              r"config.json implies \[4, 32\]"):
        load_model(d)


def test_save_refuses_bad_layout(tmp_path):
    with pytest.raises(ValueError, match="layout must be 'fused' or 'per_expert', got 'npz'"):
        save_pretrained(_model(), tmp_path, layout="npz")


# --- config.json reading ------------------------------------------------------------------------
def test_config_expert_aliases_and_legacy_rope():
    base = MoEConfig.tiny("deepseek_v3").to_hf_dict()
    for alias in ("num_experts", "num_local_experts", "n_routed_experts"):
        d = {k: v for k, v in base.items() if k != "n_routed_experts"}
        d[alias] = 8
        assert MoEConfig.from_hf_dict(d).num_experts == 8
    legacy = dict(MoEConfig.tiny("mixtral").to_hf_dict())
    del legacy["rope_parameters"]
    legacy.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = MoEConfig.from_hf_dict(legacy)
    assert cfg.rope_parameters == {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(9\) must be <= num_experts \(8\)"):
        MoEConfig.tiny("mixtral", num_experts_per_tok=9)
    with pytest.raises(ValueError, match=r"unknown model_type 'gpt2'; supported: mixtral"):
        MoEConfig.from_hf_dict({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_type 'longrope' is not supported"):
        MoEConfig.tiny("mixtral", rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"topk_method 'noaux_tc' needs n_group and topk_group"):
        MoEConfig.tiny("deepseek_v3", n_group=None)


_PEAK_SCRIPT = """
import resource, sys, torch
torch.set_num_threads(1)
from moe import MoEConfig, MoEForCausalLM, load_model
path = sys.argv[1]
MoEForCausalLM(MoEConfig.from_pretrained(path), device="meta")   # torch's one-time set-up, not the load
torch.empty(1000, 1000).copy_(torch.ones(1000, 1000))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = load_model(path)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(peak, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def test_load_peak_memory_is_one_copy(tmp_path):
    """Peak resident memory while loading stays near one copy of the weights (two would be 2.0x).
    The per-expert layout (what transformers writes) is the harder case: experts are gathered into w13/w2."""
    import subprocess
    import sys

    torch.manual_seed(0)
    cfg = MoEConfig.tiny("mixtral", hidden_size=128, moe_intermediate_size=384, num_experts=16, vocab_size=512)
    save_pretrained(MoEForCausalLM(cfg), tmp_path, layout="per_expert")
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    peak, size = map(int, out.stdout.split())
    assert size > 10_000_000
    assert peak <= 1.4 * size, f"loading peaked at {peak / size:.2f}x the weights"
