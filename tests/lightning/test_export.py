"""``sla-dist export``: never overwrites without --force, and bad inputs (safetensors, empty, truncated, a plain state
dict, a code-running pickle) give one line naming the file and exit code 2."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sla_dist.cli import main


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {"model.w": torch.arange(4.0), "teacher.w": torch.zeros(1)}, "global_step": 3}, path)
    return path


def export(capsys, *args: str) -> tuple[int, str]:
    rc = main(["export", *map(str, args)])
    return rc, capsys.readouterr().err


def test_export_refuses_to_overwrite_without_force(ckpt, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert export(capsys, ckpt, out) == (0, "")
    torch.testing.assert_close(load_file(out)["w"], torch.arange(4.0))
    save_file({"w": torch.ones(1)}, out)  # someone else's file now
    rc, err = export(capsys, ckpt, out)
    assert rc == 2 and err.count("\n") == 1 and str(out) in err and "--force" in err, err
    assert load_file(out)["w"].shape == (1,)  # untouched
    assert export(capsys, ckpt, out, "--force") == (0, "")
    torch.testing.assert_close(load_file(out)["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "run.ckpt"]  # no temporary left


def test_bad_inputs_give_one_line(ckpt, tmp_path, capsys):
    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(1)}, weights)
    renamed = tmp_path / "weights.ckpt"
    renamed.write_bytes(weights.read_bytes())
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:300])
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(1)}, plain)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello world")
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload(str(marker))}, evil)
    cases = {weights: "safetensors", renamed: "safetensors", empty: "is empty", truncated: "truncated",
             plain: "no 'state_dict'", text: "not a torch checkpoint", evil: "could run code",
             tmp_path / "missing.ckpt": "does not exist"}
    for path, words in cases.items():
        rc, err = export(capsys, path, tmp_path / f"{path.stem}.out.safetensors")
        assert rc == 2 and err.count("\n") == 1 and str(path) in err and words in err, (path, err)
        assert err.startswith("sla-dist export: error: ")
    assert not marker.exists()
