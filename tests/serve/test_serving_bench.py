"""benchmarks/serving.py's expert-parallel variants (--ep-ranks, --ep-decode): each variant serves the
same prompts through the replica's engine and its rank actors (gloo on the CPU), and the comparison
table says how many requests got the first variant's text (all of them, in float32)."""
import pytest
import torch


def test_ep_decode_variants_serve_the_same_text(ray_session, capsys):
    from benchmarks import serving
    threads = torch.get_num_threads()
    try:
        rc = serving.main(["--model", "tiny", "--device", "cpu", "--backend", "inprocess", "--ep-ranks", "2",
                           "--ep-decode", "replicated,home", "--num-prompts", "4", "--input-len", "8",
                           "--output-len", "6", "--max-batch-size", "2"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    # rank 0's own time inside its steps, beside the engine's step time
    assert out.count("rank 0 inside its steps") == 2
    rows = [line for line in out.splitlines() if line.startswith("inprocess ep2 coherent")]
    assert [r.split()[3] for r in rows] == ["decode=replicated", "decode=home"]
    assert all(r.rstrip().endswith("4/4") for r in rows), rows


@pytest.mark.parametrize("argv, message", [
    (["--ep-decode", "fast"], "--ep-decode takes a comma-separated list"),
    (["--backend", "both"], "--ep-ranks is measured with --backend inprocess"),
    (["--gpu-memory", "1GiB"], "does not combine with offloading"),
])
def test_ep_arguments_are_checked(argv, message, capsys):
    from benchmarks import serving
    with pytest.raises(SystemExit):
        serving.main(["--model", "tiny", "--ep-ranks", "2", "--backend", "inprocess", *argv])
    assert message in capsys.readouterr().err
