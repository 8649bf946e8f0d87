"""benchmarks/time_bwd_kernel.py: the list-scheduling model of dK/dV's launch in a given program order, and the
script's tiny run (in the Triton interpreter on CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import time_bwd_kernel as tbk  # noqa: E402


def test_longest_first_removes_the_simulated_tail():
    counts = torch.ones(1, 2, 64, dtype=torch.int32)
    counts[0, 1, -3:] = 40  # three long programs at the end of the grid
    order = torch.argsort(counts.flatten(), descending=True, stable=True)
    natural = tbk.simulated_tail(counts, None, sms=8, fixed=0.0)
    lpt = tbk.simulated_tail(counts, order, sms=8, fixed=0.0)
    # total 245 over 8 SMs = 30.6; natural: the long ones start at 15 and end at 55; lpt: at 0, ending at 40 (the
    # longest program itself)
    assert natural > 1.7 and lpt < 1.35, (natural, lpt)


def test_tiny_run_prints_every_order(capsys):
    tbk.main(["--tiny", "--attracted", "1", "--orders", "natural", "lpt", "split:lpt-head"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[4] for r in rows] == ["natural", "lpt", "split:lpt-head"]
    for r in rows:
        assert r[:2] == ["459", "32"] and float(r[3]) > 1.5, r
    assert float(rows[0][8]) == float(rows[1][8]) == 0.0  # the orders agree bit for bit
    assert float(rows[1][7]) <= float(rows[0][7]) and float(rows[2][7]) <= float(rows[0][7])


def test_variants_are_checked():
    with pytest.raises(ValueError, match="'split:lpt'"):
        tbk.main(["--tiny", "--orders", "natural", "split:lpt"])
