"""The adaptive layer inside the Ray expert-parallel runtime (EPConfig(parallel='adaptive')): 2 gloo
ranks hold their expert units of every layer; logits and greedy tokens equal the single-process
model for the chooser and every fixed strategy, and switching between calls changes nothing."""
import pytest
import torch

from moe import MoEConfig, MoEForCausalLM
from placement.baselines import round_robin
from placement.runtime import EPConfig, ExpertParallelRuntime

pytestmark = pytest.mark.ray


def _model():
    torch.manual_seed(0)
    m = MoEForCausalLM(MoEConfig.tiny("mixtral"), dtype=torch.float32)
    m.init_weights(std=0.2, seed=1)
    return m.eval()


def _greedy(model, ids_BT, n):
    ids = ids_BT.clone()
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            ids = torch.cat([ids, nxt], 1)
    return torch.cat(out, 1)


def test_adaptive_layer_in_the_runtime_equals_one_process(ray_session):
    model = _model()
    L, E = len(model.moe_blocks()), model.config.num_experts
    ids = torch.randint(3, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
    rt = ExpertParallelRuntime(model, round_robin(L, E, 2), EPConfig(parallel="adaptive", cpus_per_actor=0.1))
    try:
        for strategy in (None, "ep:d1", "ep:d2", "dp", "tp", "ep+tp:g1", None):  # switches between calls
            rt.set_strategy(strategy)
            torch.testing.assert_close(rt.forward(ids), want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"strategy {strategy}: {m}")
            if strategy is not None:  # the fixed strategy is the one that ran, on every rank
                assert {x["strategy"] for x in rt.counters()} == {strategy}
        tokens, _ = rt.greedy(ids, 4)
        assert torch.equal(tokens, _greedy(model, ids, 4))
        c = rt.counters()
        assert all(x["strategy"] is not None and x["dropped_tokens"] == 0 for x in c)
        with pytest.raises(ValueError, match="set_strategy"):
            rt.set_mode("coherent")
        with pytest.raises(ValueError, match="replicated"):
            rt.greedy(ids, 2, home_only=True)
        with pytest.raises(ValueError, match="load"):
            rt.load_seeded(model.config, round_robin(L, E, 2))
    finally:
        rt.shutdown()


def test_adaptive_settings_are_checked():
    with pytest.raises(ValueError, match="parallel must be one of"):
        EPConfig(parallel="auto")
