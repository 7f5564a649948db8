"""benchmarks/serving.py's expert-parallel variants (--ep-ranks, --ep-decode): each variant serves the
same prompts through the replica's engine and its rank actors (gloo on the CPU), and the comparison
table says how many requests got the first variant's text (all of them, in float32)."""
import pytest
import torch

from tests.conftest import load_benchmark


def test_ep_decode_variants_serve_the_same_text(ray_session, capsys):
    serving = load_benchmark("serving")
    threads = torch.get_num_threads()
    try:
        rc = serving.main(["--model", "tiny", "--device", "cpu", "--backend", "inprocess", "--ep-ranks", "2",
                           "--ep-decode", "replicated,home,home-logits", "--num-prompts", "4", "--input-len", "8",
                           "--output-len", "6", "--max-batch-size", "2"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    # rank 0's own time inside its steps, beside the engine's step time
    assert out.count("rank 0 inside its steps") == 3
    rows = [line for line in out.splitlines() if line.startswith("inprocess ep2 coherent")]
    # home-logits: greedy steps fetch rank 0's logits instead of its token ids (the A/B of greedy_next)
    assert [r.split()[3] for r in rows] == ["decode=replicated", "decode=home", "decode=home-logits"]
    assert all(r.rstrip().endswith("4/4") for r in rows), rows


@pytest.mark.parametrize("argv, message", [
    (["--ep-decode", "fast"], "--ep-decode takes a comma-separated list"),
    (["--backend", "both"], "--ep-ranks is measured with --backend inprocess"),
    (["--gpu-memory", "1GiB"], "does not combine with offloading"),
    (["--ep-share-gpu", "--ep-decode", "replicated,home"], "CUDA graphs cannot capture"),
    (["--ep-share-gpu", "--ep-decode", "home-logits"], "CUDA graphs cannot capture"),
])
def test_ep_arguments_are_checked(argv, message, capsys):
    serving = load_benchmark("serving")
    with pytest.raises(SystemExit):
        serving.main(["--model", "tiny", "--ep-ranks", "2", "--backend", "inprocess", *argv])
    assert message in capsys.readouterr().err


def test_ep_share_gpu_joins_the_ranks_by_gloo_on_a_share_of_one_gpu():
    serving = load_benchmark("serving")
    args = serving.argparse.Namespace(ep_ranks=2, ep_mode="coherent", placement_plan=None, ep_decode="home-eager",
                                      ep_share_gpu=True)
    got = serving._ep_settings(args)
    assert (got["comm"], got["gpus_per_rank"], got["decode"], got["cuda_graph"]) == ("gloo", 0.5, "home", False)
    assert got["greedy_tokens"] and not serving._ep_settings(
        serving.argparse.Namespace(**{**vars(args), "ep_decode": "home-eager-logits"}))["greedy_tokens"]
    from serve.ep_model import EPServeSettings
    EPServeSettings(**got)  # the replica takes them as they are


def test_ep_step_floor_counts_dense_weights_and_each_ranks_share_of_the_active_experts():
    import moe
    ep_step_floor_ms = load_benchmark("serving").ep_step_floor_ms
    from moe.tiny import ensure_tiny_model
    path = str(ensure_tiny_model())
    model = moe.load_model(path)
    E, K = model.config.num_experts, model.config.num_experts_per_tok
    expert_bytes = sum(p.numel() * p.element_size() for b in model.moe_blocks() for p in b.experts.parameters())
    _, all_1 = ep_step_floor_ms(path, 1, 10 ** 6, 1.0)  # so many rows that every expert is active
    _, all_2 = ep_step_floor_ms(path, 2, 10 ** 6, 1.0)
    _, one_2 = ep_step_floor_ms(path, 2, 1, 1.0)  # one row: K experts a layer
    assert (all_1 - all_2) * 1e6 == pytest.approx(expert_bytes / 2)
    assert (all_2 - one_2) * 1e6 == pytest.approx(expert_bytes / 2 * (1 - K / E))
    ms, mb = ep_step_floor_ms(path, 2, 1, 2.0)
    assert ms == pytest.approx(mb / 2.0)  # MB / (GB/s) = ms


def test_ep_comparison_survives_a_variant_that_failed(capsys):
    """A variant whose requests all failed (session 17's first runs) prints as such, instead of
    dividing by its zero throughput."""
    serving = load_benchmark("serving")
    failed = {"backend": "inprocess ep2 coherent decode=replicated", "output_throughput": 0.0,
              "mean_tpot_ms": float("nan"), "failed": 2, "texts": [None, None]}
    good = {"backend": "inprocess ep2 coherent decode=home", "output_throughput": 10.0, "mean_tpot_ms": 5.0,
            "failed": 0, "texts": ["a", "b"]}
    serving.compare_ep_variants([failed, good])
    rows = capsys.readouterr().out.splitlines()[-2:]
    assert rows[0].endswith("0/2  (2 failed)") and " - " in rows[0]
    assert rows[1].rstrip().endswith("0/2") and " - " in rows[1]
