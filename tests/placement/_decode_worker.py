"""Run in each spawned gloo rank by test_decode.py: home-only decoding equals one process."""
import torch
import torch.distributed as dist

from moe import MoEConfig, MoEForCausalLM
from placement.baselines import round_robin
from placement.decode import decode_step
from placement.runtime import apply_placement


def _model(family, kw):
    torch.manual_seed(0)
    m = MoEForCausalLM(MoEConfig.tiny(family, **kw), dtype=torch.float32)
    m.init_weights(std=0.2, seed=1)
    return m.eval()


@torch.no_grad()
def _decode(model, ids, n, step):
    cache = model.new_cache(ids.shape[0], ids.shape[1] + n)
    logits = model(ids, cache=cache)
    toks, steps = [], [logits[:, -1:]]
    for i in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
        if i < n - 1:
            logits = step(cache, nxt)
            steps.append(logits[:, -1:])
    return torch.cat(toks, 1), torch.cat(steps, 1)


def check_decode(rank, world, init_file, family, kw, mode, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model(family, kw)
        ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(0))
        ref = _decode(model, ids, 4, lambda c, x: model(x, cache=c))
        n_moe = len(model.moe_blocks())
        state = apply_placement(model, round_robin(n_moe, model.config.num_experts, world), rank, mode)
        got = _decode(model, ids, 4, lambda c, x: decode_step(model, c, x, state))
        assert torch.equal(got[0], ref[0]), f"rank {rank}: tokens differ"
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
        if rank == 0:
            torch.save(state.counters, out_file)
    finally:
        dist.destroy_process_group()
