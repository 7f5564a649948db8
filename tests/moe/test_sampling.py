"""Sampling: settings validation, top-k/top-p masks against a plain per-row formula, seeded draws."""
import math

import pytest
import torch

from moe.sampling import SamplingParams, sample_tokens, top_k_top_p_keep
from tests.conftest import load_benchmark


def reference_keep(logits_V: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Plain formula: sort once, take the first k, renormalise, take tokens until the mass reaches p."""
    order = sorted(range(len(logits_V)), key=lambda i: (-float(logits_V[i]), i))
    if top_k > 0:
        order = order[:top_k]
    z = [math.exp(float(logits_V[i]) - float(logits_V[order[0]])) for i in order]
    total = sum(z)
    kept, mass = [], 0.0
    for i, w in zip(order, z):
        if top_p < 1.0 and mass >= top_p:
            break
        kept.append(i)
        mass += w / total
    return set(kept)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (7, 0.8),
                                         (3, 0.05), (40, 0.999), (100, 0.3)])
def test_top_k_top_p_mask_matches_reference(top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 1000 + int(top_p * 100))
    logits_RV = torch.randn(6, 33, generator=g) * 3
    keep_RV = top_k_top_p_keep(logits_RV, torch.full((6,), top_k), torch.full((6,), top_p))
    for r in range(6):
        got = set(torch.nonzero(keep_RV[r]).flatten().tolist())
        assert got == reference_keep(logits_RV[r], top_k, top_p), (r, top_k, top_p)


def test_mask_with_different_settings_per_row():
    logits_RV = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    k, p = torch.tensor([0, 4, 2]), torch.tensor([0.6, 1.0, 0.99])
    keep_RV = top_k_top_p_keep(logits_RV, k, p)
    for r in range(3):
        assert set(torch.nonzero(keep_RV[r]).flatten().tolist()) == reference_keep(logits_RV[r], int(k[r]), float(p[r]))


def test_greedy_is_argmax_and_ignores_seed():
    logits_RV = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.0, seed=s) for s in range(4)]
    gens = [p.make_generator() for p in params]
    assert sample_tokens(logits_RV, params, gens) == logits_RV.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_batch_independent():
    logits_RV = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1234)

    def draws(row_logits, batch_logits=None, n=20):
        g = p.make_generator()
        out = []
        for _ in range(n):
            if batch_logits is None:
                out.append(sample_tokens(row_logits[None], [p], [g])[0])
            else:  # the same request sharing its batch with others that draw from other generators
                others = [SamplingParams(temperature=1.0, seed=9), SamplingParams()]
                got = sample_tokens(torch.stack([batch_logits[0], row_logits, batch_logits[1]]),
                                    [others[0], p, others[1]], [others[0].make_generator(), g, None])
                out.append(got[1])
        return out

    alone = draws(logits_RV[0])
    assert alone == draws(logits_RV[0])
    assert alone == draws(logits_RV[0], batch_logits=logits_RV[3:5])
    assert len(set(alone)) > 1  # it really samples
    other_seed = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=4321)
    g = other_seed.make_generator()
    assert [sample_tokens(logits_RV[0][None], [other_seed], [g])[0] for _ in range(20)] != alone


def test_samples_follow_the_filtered_distribution():
    logits_V = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    p = SamplingParams(temperature=0.7, top_k=4, seed=0)
    g = p.make_generator()
    n = 4000
    counts = torch.zeros(6)
    for t in sample_tokens(logits_V.repeat(n, 1), [p] * n, [g] * n):
        counts[t] += 1
    scaled = logits_V / 0.7
    want = torch.softmax(torch.where(torch.arange(6) < 4, scaled, torch.tensor(float("-inf"))), dim=0)
    assert counts[4:].sum() == 0  # outside the top 4: never drawn
    assert torch.allclose(counts / n, want, atol=0.03)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(seed=1.5), "seed=1.5"),
    (dict(stop=("",)), "stop"),
    (dict(stop_token_ids=(-3,)), "stop_token_ids"),
])
def test_bad_settings_name_the_value(kwargs, needle):
    with pytest.raises(ValueError, match="SamplingParams") as e:
        SamplingParams(**kwargs)
    assert needle in str(e.value)
    assert ";" in str(e.value)  # the message goes on to say what to do


def test_settings_are_normalised():
    p = SamplingParams(stop="###", stop_token_ids=[5, 6], temperature=1)
    assert p.stop == ("###",) and p.stop_token_ids == (5, 6)
    assert isinstance(p.temperature, float) and not p.greedy
    assert SamplingParams().greedy
    assert SamplingParams().make_generator() is None


def test_unfiltered_sampling_follows_the_softmax_and_mixed_batches_keep_greedy_rows():
    """No filter (no sort): the exponential race draws from softmax(logits / T); greedy rows in the
    same batch stay the argmax, and unseeded rows draw from the global RNG."""
    logits_V = torch.tensor([1.5, 1.0, 0.0, -0.5, -2.0])
    n = 4000
    torch.manual_seed(0)
    sampled = SamplingParams(temperature=1.3)
    greedy = SamplingParams()
    batch = torch.stack([logits_V, logits_V.flip(0)]).repeat(n, 1)  # rows alternate sampled / greedy
    params = [sampled, greedy] * n
    got = sample_tokens(batch, params, [None] * (2 * n))
    assert set(got[1::2]) == {4}  # the flipped row's argmax is its last entry
    counts = torch.bincount(torch.tensor(got[0::2]), minlength=5).float()
    assert torch.allclose(counts / n, torch.softmax(logits_V / 1.3, dim=0), atol=0.03)


def test_sampling_benchmark_script_runs_on_cpu(capsys):
    mod = load_benchmark("sampling")
    assert mod.main(["--device", "cpu", "--vocab", "512", "--rows", "1,2", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "top_p 0.9" in out and "seeded" in out
