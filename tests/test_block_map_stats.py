"""benchmarks/block_map_stats.py: the balance of the dK/dV kernel's work over its programs, every number by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import block_map_stats as bms  # noqa: E402

from sla_dist.kernels.block_map import CRITICAL, MARGINAL, build_block_map  # noqa: E402


def test_list_stats_by_hand():
    stats = bms.list_stats(torch.tensor([0, 1, 1, 2, 6], dtype=torch.int32))
    # mean 10 / 5 = 2; the 1 % longest of 5 lists is the longest one: 6 of 10
    assert stats == dict(mean=2.0, min=0.0, max=6.0, max_over_mean=3.0, top1pct_share=0.6, empty=1)


def test_grid_imbalance_follows_launch_order():
    # two slots, cost = length: 3 | 1, 1, 1 -> both slots busy 3 = 6 / 2, balanced
    assert bms.grid_imbalance(torch.tensor([3, 1, 1, 1]), slots=2, overhead=0) == 1.0
    # the long program last: slots end at 2 and 1 + 3 = 4, against 6 / 2 = 3
    assert bms.grid_imbalance(torch.tensor([1, 1, 1, 3]), slots=2, overhead=0) == pytest.approx(4 / 3)
    # overhead 1 per program: costs 2, 2, 2, 4 -> slot ends 4 and 2 + 4 = 6, against 10 / 2 = 5
    assert bms.grid_imbalance(torch.tensor([1, 1, 1, 3]), slots=2, overhead=1) == pytest.approx(6 / 5)
    # equal programs, 3 on 2 slots: the partial last wave, 2 / 1.5
    assert bms.grid_imbalance(torch.tensor([1, 1, 1]), slots=2, overhead=0) == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="slots=0 must be >= 1"):
        bms.grid_imbalance(torch.tensor([1]), slots=0, overhead=0)


def test_one_key_block_chosen_by_every_query_block():
    """4 query blocks x 4 key blocks, one head: every query block's single critical block is key block 0, so its
    dK/dV program walks 4 query blocks and the other three none."""
    block_class = torch.full((1, 1, 4, 4), MARGINAL, dtype=torch.int8)
    block_class[..., 0] = CRITICAL
    stats = bms.block_map_stats(build_block_map(block_class, 256, 256, 64, 64), slots=4, overhead=0)
    (head,) = stats["heads"]
    assert head["dkdv"] == dict(mean=1.0, min=0.0, max=4.0, max_over_mean=4.0, top1pct_share=1.0, empty=3)
    assert head["fwd_dq"]["min"] == head["fwd_dq"]["max"] == 1.0
    # 4 programs on 4 slots: the longest (4) against 4 / 4 balanced; forward / dQ: 4 equal programs, balanced
    assert stats["dkdv_imbalance"] == stats["dkdv_longest_first"] == 4.0 and stats["fwd_dq_imbalance"] == 1.0
    assert (stats["nq"], stats["nk"], stats["critical_fraction"]) == (4, 4, 0.25)


def test_the_long_list_launched_last_or_first():
    """Key block 3, the last launched, is every query block's critical one: on 2 slots at cost 1 + length the
    programs cost 1, 1, 1, 5 -> the slots end at 2 and 1 + 5 = 6, against 8 / 2 = 4; longest first: 5 | 1, 1, 1."""
    block_class = torch.full((1, 1, 4, 4), MARGINAL, dtype=torch.int8)
    block_class[..., 3] = CRITICAL
    stats = bms.block_map_stats(build_block_map(block_class, 256, 256, 64, 64), slots=2, overhead=1)
    assert stats["dkdv_imbalance"] == 1.5 and stats["dkdv_longest_first"] == 1.25


def test_split_takes_a_long_list_in_parts():
    """One head, a list of 16 query blocks and seven empty ones, on 2 slots: whole, the long list runs alone (16
    against 16 / 2 = 8 balanced); split (lpt-head, part length 8, the fewest allowed) its two halves run side by
    side. With overhead 1 per program the parts cost 9, 9 and the empty lists 1 each, the slots end at 9 + 4 and
    9 + 3, against (16 + 8) / 2 = 12 balanced."""
    lengths = torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    assert bms.grid_imbalance(lengths, slots=2, overhead=0) == 2.0
    assert bms.split_imbalance(lengths, slots=2, overhead=0, order="lpt-head") == 1.0
    assert bms.split_imbalance(lengths, slots=2, overhead=1, order="lpt-head") == pytest.approx(13 / 12)


def test_cli_reports_each_source_and_a_summary(capsys):
    bms.main(["--grid", "4,8,8", "--heads", "2", "--head-dim", "32", "--inputs", "iid", "field", "--block-q", "64"])
    out = capsys.readouterr().out
    assert "256 tokens (grid (4, 8, 8), tile (4, 4, 4)), 2 heads of 32, topk 0.05 (n_c 1)" in out
    summary = out.split("Worst head of each statistic:")[1].strip().splitlines()
    assert [line.split("|")[1].strip() for line in summary[2:]] == ["iid", "field"]
    # 4 query blocks each choose 1 of 4 key blocks: a mean list of 1
    assert all(line.split("|")[2].strip() == "1.00" for line in summary[2:])
