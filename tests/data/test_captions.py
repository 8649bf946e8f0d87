"""Caption files in each format and the lookup of a video's caption."""

import json

import pytest

from sla_dist.data.captions import caption_for, load_captions


def test_formats_agree(tmp_path):
    pairs = {"a.mp4": "a cat, running", "sub/b.webm": 'a "quoted" dog'}
    (tmp_path / "c.json").write_text(json.dumps(pairs))
    (tmp_path / "l.json").write_text(json.dumps([{"video": k, "caption": v} for k, v in pairs.items()]))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"video": k, "caption": v}) for k, v in pairs.items()))
    (tmp_path / "c.csv").write_text('video,caption\na.mp4,"a cat, running"\nsub/b.webm,"a ""quoted"" dog"\n')
    for name in ("c.json", "l.json", "c.jsonl", "c.csv"):
        assert load_captions(tmp_path / name) == pairs, name


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_captions(tmp_path / "nope.json")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match="'.txt'"):
        load_captions(tmp_path / "c.txt")
    (tmp_path / "c.jsonl").write_text('{"video": "a.mp4", "text": "x"}\n')
    with pytest.raises(ValueError, match="entry 0 .* needs 'video' and 'caption'"):
        load_captions(tmp_path / "c.jsonl")
    (tmp_path / "c.json").write_text('{"a.mp4": 3}')
    with pytest.raises(ValueError, match="'a.mp4': 3"):
        load_captions(tmp_path / "c.json")


def test_lookup_prefers_relative_path_then_name_then_stem(tmp_path):
    captions = {"x/a.mp4": "relative", "a.mp4": "name", "a": "stem", "b": "stem b"}
    assert caption_for(str(tmp_path / "x/a.mp4"), tmp_path, captions) == "relative"
    assert caption_for(str(tmp_path / "y/a.mp4"), tmp_path, captions) == "name"
    assert caption_for(str(tmp_path / "y/b.webm"), tmp_path, captions) == "stem b"
    assert caption_for(str(tmp_path / "c.mp4"), tmp_path, captions) is None
