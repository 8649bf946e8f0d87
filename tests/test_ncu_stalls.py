"""benchmarks/ncu_stalls.py: stall tables from ncu's source page (a small page written here in ncu's CSV form)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ncu_stalls  # noqa: E402

HEADER = ["Address", "Source", ncu_stalls.SAMPLES, "# Samples", "stall_long_sb", "stall_barrier", "stall_wait",
          "stall_long_sb (Not Issued)"]


def _page(path: Path, kernels: list[tuple[str, list[tuple[str, str, int, int, int]]]]) -> Path:
    lines = []
    for name, rows in kernels:
        lines.append(f'"Kernel Name","{name}",')
        lines.append(",".join(f'"{h}"' for h in HEADER))
        for address, source, long_sb, barrier, wait in rows:
            total = long_sb + barrier + wait
            lines.append(",".join(f'"{x}"' for x in (address, source, total, total, long_sb, barrier, wait, 999)))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shares_by_reason_and_hottest_instructions(tmp_path):
    page = _page(tmp_path / "sass.csv", [
        ("_sla_fwd_kernel", [("0x7f00", "  SYNCS.PHASECHK.TRANS64.TRYWAIT P4", 0, 10, 0),
                             ("0x7f10", "  @!P4 BRA 0x7f00", 60, 0, 0), ("0x7f20", "  HGMMA.64x64x16", 0, 0, 30)]),
        ("_bwd_dq_kernel", [("0x8000", "  WARPGROUP.DEPBAR.LE gsb0, 0x0", 0, 5, 0)]),
        ("_sla_fwd_kernel", [("0x9000", "  NOP", 1000, 0, 0)]),  # a second launch of a kernel: the first is kept
    ])
    kernels = ncu_stalls.read_source_page(page)
    assert list(kernels) == ["_sla_fwd_kernel", "_bwd_dq_kernel"]
    total, shares, lines = ncu_stalls.stall_summary(kernels["_sla_fwd_kernel"], top=2)
    assert total == 100  # the "(Not Issued)" columns are a subset of the samples, not added to them
    assert shares == [("long_sb", 0.6), ("wait", 0.3), ("barrier", 0.1)]
    assert [(a, s, share, r) for a, s, share, r in lines] == [("0x7f10", "@!P4 BRA 0x7f00", 0.6, "long_sb"),
                                                              ("0x7f20", "HGMMA.64x64x16", 0.3, "wait")]
    text = ncu_stalls.report(kernels, top=1)
    assert "== _bwd_dq_kernel: 1 SASS instructions, 5 stall samples" in text
    assert "long_sb 60.0 %" in text and "NOP" not in text


def test_a_page_without_kernels_is_named(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("==PROF== Disconnected\n")
    with pytest.raises(ValueError, match="empty.csv: no kernel rows"):
        ncu_stalls.read_source_page(empty)


def test_cli_needs_a_csv_or_run(capsys):
    with pytest.raises(SystemExit):
        ncu_stalls.main([])
    assert "give the CSV to read, --profile DIR or --run" in capsys.readouterr().err
