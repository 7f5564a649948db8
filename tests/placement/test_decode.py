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
