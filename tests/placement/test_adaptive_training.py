"""The adaptive layer in training: switching strategies between SGD steps (the layer alone, a
MoELayer and a whole MoEForCausalLM trained data-parallel) changes nothing numerically, on 2 gloo
ranks (spawned processes, loopback only)."""
import pytest
import torch

from . import _adaptive_worker as worker
from ._adaptive_worker import spawn as _spawn


def test_switching_mid_training_changes_nothing():
    _spawn(worker.check_switch_mid_training, 2, 4, 6, 8, 2)


def test_training_moe_layer_sharded_with_apply_adaptive_parallel():
    _spawn(worker.check_moe_layer_in_training, 2)


def test_apply_adaptive_parallel_needs_moe_blocks():
    from placement.adaptive import apply_adaptive_parallel
    with pytest.raises(ValueError, match="no MoE blocks"):
        apply_adaptive_parallel(torch.nn.Linear(2, 2))


def test_causal_lm_training_switching_strategies_matches_one_process():
    _spawn(worker.check_causal_lm_training_with_switches, 2)
