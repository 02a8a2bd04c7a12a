"""KV rows: taking and freeing rows, the last row moving into a hole, the masks of each step kind, a prompt
staged in chunks, and prompts prefilled after a cached prefix."""

import pytest
import torch

from server.engine.kv_cache import KVCacheFull, RowKVCache


def cache(rows=3):
    return RowKVCache(n_layers=1, max_rows=rows, n_kv_heads=1, max_len=8, head_dim=2, device="cpu",
                      dtype=torch.float32)


def test_rows_are_taken_and_freed_with_the_last_moving_in():
    kv = cache()
    kv.add_rows(3)
    kv.lengths = [2, 1, 3]
    kv.keys[0][2, :, :3] = 7.0
    with pytest.raises(KVCacheFull):
        kv.add_rows(1)
    assert kv.remove_row(0) == 2              # row 2 moved into row 0
    assert kv.lengths == [3, 1] and torch.equal(kv.keys[0][0, :, :3], torch.full((1, 3, 2), 7.0))
    assert kv.remove_row(1) is None and kv.n_free == 2


def test_masks_and_positions():
    kv = cache()
    mask, pos, _ = kv.begin_prefill(kv.add_rows(2), [3, 1])
    assert mask.shape == (2, 1, 3, 3) and pos.tolist() == [[0, 1, 2]] * 2
    assert mask[1, 0].tolist() == [[True, False, False]] * 3      # padding keys are never attended
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    step = kv.begin_decode()
    mask, pos = step.mask, step.positions
    assert pos.tolist() == [[3], [1]] and mask.shape == (2, 1, 1, 4)
    assert mask[1, 0, 0].tolist() == [True, True, False, False]
    k = torch.ones(2, 1, 1, 2)
    keys, _ = kv.update(k, k, 0)
    assert keys.shape == (2, 1, 4, 2) and keys[1, 0, 1].tolist() == [1.0, 1.0]
    kv.add_rows(1)                                             # a row joining after the decode part was set up
    kv.end_decode(step)
    assert kv.lengths == [4, 2, 0]


def test_a_prompt_in_chunks_is_staged_then_adopted_into_a_running_row():
    kv = cache(rows=2)
    kv.add_rows(1)
    kv.lengths = [2]
    mask, pos, _ = kv.begin_chunk(0, 3)
    assert mask.shape == (1, 1, 3, 3) and pos.tolist() == [[0, 1, 2]]
    first = torch.arange(6.0).view(1, 1, 3, 2)
    keys, _ = kv.update(first, first, 0)
    assert torch.equal(keys, first)
    mask, pos, _ = kv.begin_chunk(3, 2)
    assert pos.tolist() == [[3, 4]]
    assert mask[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    second = torch.full((1, 1, 2, 2), 9.0)
    keys, _ = kv.update(second, second, 0)                     # the chunk attends to the one before it
    assert torch.equal(keys, torch.cat([first, second], dim=2))
    assert kv.n_active == 1                                    # the running rows are untouched meanwhile
    assert kv.adopt_staged(5) == 1 and kv.lengths == [2, 5]
    assert torch.equal(kv.keys[0][1, :, :5], keys[0]) and torch.equal(kv.values[0][1, :, :5], keys[0])


def test_prompts_after_cached_prefixes_write_and_attend_from_where_their_prefix_ends():
    kv = cache()
    rows = kv.add_rows(2)
    prefix = torch.full((1, 3, 2), 5.0)                        # 3 positions of one layer, one kv head
    kv.load_prefix(rows[0], [prefix], [-prefix])
    mask, pos, _ = kv.begin_prefill_after(rows, [5, 2], [3, 0])   # row 0: positions 3, 4; row 1: 0, 1 (no prefix)
    assert pos.tolist() == [[3, 4], [0, 1]] and mask.shape == (2, 1, 2, 5) and kv.lengths == [5, 2]
    assert mask[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]
    assert mask[1, 0].tolist() == [[True] + [False] * 4, [True, True] + [False] * 3]
    new = torch.arange(8.0).view(2, 1, 2, 2)
    keys, values = kv.update(new, -new, 0)
    assert keys.shape == (2, 1, 5, 2) and torch.equal(keys[0, 0, :3], prefix[0])
    assert torch.equal(keys[0, 0, 3:], new[0, 0])
    assert torch.equal(keys[1, 0, :2], new[1, 0]) and torch.equal(values[0, 0, :3], -prefix[0])
    read_keys, read_values = kv.read_prefix(rows[0], 4)
    assert torch.equal(read_keys[0], keys[0, :, :4]) and torch.equal(read_values[0], values[0, :, :4])
    assert kv.staging_row == kv.max_rows == 3
