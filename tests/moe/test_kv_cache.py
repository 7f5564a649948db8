"""KVCache: per-row room, and padding past the end never overwrites a valid token."""
import pytest
import torch

from moe.kv_cache import KVCache


def test_padding_past_the_end_keeps_the_last_valid_slot():
    # row 0 decodes its last token (slot max_len - 1) while row 1 prefills 3 tokens: row 0's two
    # padding tokens fall past the end and must land in the spare slot, not on slot max_len - 1
    S = 6
    c = KVCache(2, S)
    c.lengths[0] = S - 1
    valid = torch.tensor([[True, False, False], [True, True, True]])
    c.check_room(3, valid)  # only valid tokens need room
    k = torch.arange(1, 7, dtype=torch.float32).view(2, 1, 3, 1)  # distinct value per (row, token)
    k_all, v_all = c.update(0, k, k.clone(), num_slots=S)
    assert k_all.shape == (2, 1, S, 1)
    assert k_all[0, 0, S - 1, 0] == 1.0  # row 0's valid token, not a padding value (2 or 3)
    assert k_all[1, 0, :3, 0].tolist() == [4.0, 5.0, 6.0]
    c.advance(valid, 3)
    assert c.lengths.tolist() == [S, 3]


def test_check_room_counts_valid_tokens_and_names_the_fix():
    c = KVCache(2, 4)
    c.lengths[0] = 3
    with pytest.raises(ValueError, match="larger max_len"):
        c.check_room(2)  # without a mask every token counts
    c.check_room(2, torch.tensor([[True, False], [True, True]]))
    with pytest.raises(ValueError, match="would hold 5 tokens"):
        c.check_room(2, torch.tensor([[True, True], [False, False]]))
