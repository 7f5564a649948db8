"""ExFlow decoding (placement/decode.py) in spawned gloo ranks: each row's attention runs only
on its home rank, the logits still equal the single-process model's, and the rows moved are
the ones placement/metrics.py predicts for the decode steps' routing."""
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from . import _decode_worker as worker


@pytest.mark.parametrize("family, kw, world, mode", [
    ("qwen2_moe", {}, 2, "coherent"),  # shared experts with a sigmoid gate, top-2
    ("deepseek_v3", {}, 2, "coherent"),  # MLA keys/values, a dense first layer, grouped routing
    ("mixtral", {"num_experts_per_tok": 1, "num_hidden_layers": 3}, 4, "coherent"),
    ("mixtral", {"num_hidden_layers": 3}, 4, "standard"),  # top-2, two all-to-alls per layer
])
def test_home_only_decode_equals_single_process(family, kw, world, mode):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "counters.pt")
        mp.spawn(worker.check_decode, args=(world, os.path.join(d, "init"), family, kw, mode, out), nprocs=world)
        c = torch.load(out)
    assert c["layers"] > 0
    assert c["dispatch_total"] > 0
    assert c["dispatch_total"] + c["combine_total"] == pytest.approx(c["predicted"])
    if mode == "standard":  # every partial sum returns to the origin
        assert c["combine_total"] == c["dispatch_total"]
    if mode == "coherent" and kw.get("num_experts_per_tok") == 1:
        assert c["combine_rows"] == 0 and c["all_to_all_calls"] == c["layers"]
    assert c["all_gather_calls"] == 3  # one collective per decode step


@pytest.mark.parametrize("mode", ["coherent", "standard"])
def test_sync_free_step_equals_default_step(mode):
    """The step HomeDecodeGraphs captures (slots given, moved rows summed on the device) is the same
    step: same logits, tokens and counters on 2 gloo ranks."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "counters.pt")
        mp.spawn(worker.check_sync_free_step, args=(2, os.path.join(d, "init"), "mixtral", {"num_hidden_layers": 3},
                                                     mode, out), nprocs=2)
        c = torch.load(out)
    assert c["layers"] == 3 * 3 and c["dispatch_rows"] > 0


@pytest.mark.parametrize("mode", ["coherent", "standard"])
def test_idle_rows_stay_put_and_the_others_match_single_process(mode):
    """Serving batches have idle rows (valid False): decode_step leaves them where they are, in the
    cache and on their home rank, and the other rows' logits equal the single-process forward's."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "counters.pt")
        mp.spawn(worker.check_idle_rows, args=(2, os.path.join(d, "init"), "mixtral", {"num_hidden_layers": 3},
                                                mode, out), nprocs=2)
        c = torch.load(out)
    assert c["layers"] == 3 * (1 + 5) and c["dispatch_total"] > 0  # the prefill (replicated) and 5 steps


@pytest.mark.parametrize("mode", ["coherent", "standard"])
def test_collectives_through_host_memory_move_the_same_rows(mode):
    """EPConfig.comm='gloo' on GPUs stages every collective through host memory; forced on here (CPU
    tensors), the serving steps (replicated prefill, home-only decode) are bitwise the unstaged ones."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "calls.pt")
        mp.spawn(worker.check_staged_collectives, args=(2, os.path.join(d, "init"), mode, out), nprocs=2)
        c = torch.load(out)
    assert c["staged_calls"] >= 2 * 2 + 3  # the prefill's all-to-alls / all-gathers and every decode step


@pytest.mark.parametrize("mode", ["coherent", "standard"])
def test_every_rank_splits_by_rank_0s_routing(mode):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "counters.pt")
        mp.spawn(worker.check_routing_from_rank0, args=(2, os.path.join(d, "init"), mode, out), nprocs=2)
        c = torch.load(out)
    assert c["layers"] == 3 and c["dispatch_rows"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_two_nccl_ranks_split_by_rank_0s_routing():
    """The same on two GPUs over NCCL, which does not check sizes: without the broadcast it would wait
    forever (session 16's stall); with it rank 0's logits equal one process's."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "counters.pt")
        mp.spawn(worker.check_routing_from_rank0, args=(2, os.path.join(d, "init"), "coherent", out, "cuda"),
                 nprocs=2)
        c = torch.load(out)
    assert c["layers"] == 3 and c["dispatch_rows"] > 0


@pytest.mark.parametrize("home_only", [False, True])
def test_greedy_feeds_every_rank_rank_0s_tokens(home_only):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "tokens.pt")
        mp.spawn(worker.check_greedy_takes_rank0_tokens, args=(2, os.path.join(d, "init"), home_only, out), nprocs=2)
        assert torch.load(out)["tokens"].shape == (3, 4)


def test_ep_check_names_where_the_ranks_drift_apart():
    """MOEFLOW_EP_CHECK=1 with one rank's hidden state perturbed in one row: every rank raises at the first
    MoE layer, naming the perturbed row (1 * 5 + 3) and the one after it (its attention reads it)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "msg.pt")
        mp.spawn(worker.check_disagreement_raises, args=(2, os.path.join(d, "init"), out), nprocs=2)
        msgs = [torch.load(f"{out}.{r}")["msg"] for r in range(2)]
    for r, m in enumerate(msgs):
        assert m.startswith(f"rank {r}: the ranks hold different ['x'") and "at MoE layer 0" in m, m
        assert "2 of 10 rows differ here (first: [8, 9])" in m, m


def test_serving_ranks_agree_to_decode_eagerly_when_one_capture_fails():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.pt")
        mp.spawn(worker.check_serve_capture_agreement, args=(2, os.path.join(d, "init"), out), nprocs=2)
        assert torch.load(out)["steps"] == 4


def test_home_decode_graphs_refuses_what_it_cannot_capture():
    from moe import MoEConfig, MoEForCausalLM
    from placement.decode import HomeDecodeGraphs
    from placement.runtime import TokenState
    model = MoEForCausalLM(MoEConfig.tiny("mixtral"), dtype=torch.float32)
    with pytest.raises(ValueError, match="captures CUDA graphs; the cache is on cpu"):
        HomeDecodeGraphs(model, model.new_cache(2, 8), TokenState(0, 1, "coherent"))


@pytest.mark.gpu
def test_gpu_home_decode_graphs_equal_eager_steps():
    """One NCCL rank on the GPU: decode steps replayed from HomeDecodeGraphs (all-to-alls and the
    all-reduce inside the graph) give the eager decode_step's logits and counters, across a slot
    bucket boundary."""
    import torch.distributed as dist

    from moe import MoEConfig, MoEForCausalLM
    from placement.baselines import round_robin
    from placement.decode import HomeDecodeGraphs, decode_step
    from placement.runtime import apply_placement
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(d, 'init')}", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            model = MoEForCausalLM(MoEConfig.tiny("mixtral", num_hidden_layers=3), dtype=torch.bfloat16,
                                   device="cuda")
            model.init_weights(std=0.2, seed=1)
            model.eval()
            model.set_backend("triton")
            state = apply_placement(model, round_robin(len(model.moe_blocks()), model.config.num_experts, 1), 0,
                                    "coherent", backend="triton")
            ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(0)).cuda()
            valid = torch.ones(11, 3, 1, dtype=torch.bool, device="cuda")
            valid[3:6, 1] = False  # row 1 idles for three steps (a serving batch's free row)
            runs = []
            for graphs in (False, True):
                for k in state.counters:
                    state.counters[k] = 0
                cache = model.new_cache(3, 5 + 12)
                replay = HomeDecodeGraphs(model, cache, state, bucket=8) if graphs else None
                with torch.no_grad():
                    logits = model(ids, cache=cache, last_only=True)
                    steps = []
                    for i in range(11):  # lengths 5..15: two slot buckets of 8
                        nxt = logits[:, -1].argmax(-1, keepdim=True)
                        logits = (replay.step(nxt, valid[i], 5 + i).clone() if graphs
                                  else decode_step(model, cache, nxt, state, valid_B1=valid[i]))
                        steps.append(logits)
                    assert cache.lengths.tolist() == [16, 13, 16]
                if replay is not None:
                    replay.flush_counters()
                    assert replay._graphs.keys() == {8, 16}
                runs.append((torch.cat(steps, 1), dict(state.counters)))
            (l0, c0), (l1, c1) = runs
            torch.testing.assert_close(l1.float(), l0.float(), rtol=0, atol=0)
            assert c0 == c1
        finally:
            dist.destroy_process_group()
