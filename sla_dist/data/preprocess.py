"""Raw videos + captions -> latent shards + index (the engine behind ``sla-dist preprocess``).

The ordered input list is cut into shards of ``shard_size`` videos; shard ``i`` belongs to rank ``i % world_size``.
A rank skips shards whose file already exists (they are complete: shards are flushed and renamed into place), so a
killed run restarts where it stopped (removing the temporary files it left) and ranks never encode the same video. Videos that cannot be read, are too short, or
have no caption are reported and recorded in their shard's ``skipped`` list. The rank that writes the last missing
shard writes ``index.json`` (see :func:`sla_dist.data.shards.build_index`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional

import torch

from sla_dist.data.captions import caption_for, load_captions
from sla_dist.data.shards import (ENCODERS_NAME, INDEX_NAME, PLAN_NAME, EncodedSample, SampleRecord, build_index,
                                  read_json, remove_stale_temps, shard_path, write_json, write_json_once,
                                  write_shard)
from sla_dist.data.video import ClipShape, choose_shape, clip_starts, list_videos, probe, read_clip
from sla_dist.kernels.block_map import num_blocks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
JSON_TEMP_AGE = 60.0
"""Seconds after which a JSON file's temporary is a killed writer's (writing one takes milliseconds)."""


@dataclass
class PreprocessConfig:
    """Everything ``sla-dist preprocess`` needs; the recipe section ``preprocess:`` uses these field names."""

    videos: str = ""
    """Directory searched recursively for videos, or a text file listing one video path per line."""

    captions: str = ""
    """Caption file (.json, .jsonl or .csv; see sla_dist/data/captions.py)."""

    out: str = ""
    """Output dataset directory (plan.json, encoders.json, shards/, index.json)."""

    vae: str | None = None
    """Local diffusers VAE directory (or pipeline root with vae/)."""

    text_encoder: str | None = None
    """Local T5-family encoder directory (or pipeline root with text_encoder/ and tokenizer/)."""

    tokenizer: str | None = None
    """Tokenizer directory when it is neither beside the text encoder nor in a sibling tokenizer/ folder."""

    clip_shapes: list[str] = field(default_factory=lambda: ["81x480x832"])
    """Clip buckets as FRAMESxHEIGHTxWIDTH; each video gets the closest aspect ratio it is long enough for."""

    fps: float = 16.0
    """Frame rate clips are sampled at (Wan 2.1: 16)."""

    clips_per_video: int = 1
    """Clips taken from each video, spread evenly over its length."""

    shard_size: int = 64
    """Videos per shard (the unit of work and of restart)."""

    text_len: int = 512
    """Tokenizer length: captions are truncated to it, and training pads embeddings back to it (Wan: 512)."""

    text_batch: int = 16
    """Captions per text-encoder call."""

    device: str | None = None
    """Torch device for the encoders; default cuda:LOCAL_RANK when CUDA is available, else cpu."""

    dtype: str | None = None
    """Encoder compute dtype (float32, bfloat16, float16); default bfloat16 on CUDA, float32 on CPU."""

    save_dtype: str = "bfloat16"
    """Dtype of the stored latents and text embeddings."""

    def __post_init__(self) -> None:
        for name in ("videos", "captions", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required (got {getattr(self, name)!r})")
        self.clip_shapes = list(self.clip_shapes)
        if not self.clip_shapes:
            raise ValueError("clip_shapes is empty: give at least one FRAMESxHEIGHTxWIDTH")
        self.shapes()  # validates each entry
        for name in ("clips_per_video", "shard_size", "text_len", "text_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not self.fps > 0:
            raise ValueError(f"fps={self.fps} must be positive")
        for name in ("dtype", "save_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name}={value!r} is not one of {sorted(DTYPES)}")

    def shapes(self) -> list[ClipShape]:
        return [ClipShape.parse(s) for s in self.clip_shapes]

    def settings(self) -> dict:
        """The options that decide the output; a restart must use the same (device and dtype may change)."""
        keep = ("captions", "vae", "text_encoder", "tokenizer", "clip_shapes", "fps", "clips_per_video",
                "shard_size", "text_len", "save_dtype")
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass
class PreprocessSection:
    """The ``preprocess:`` section of a recipe, as the recipe schema (OmegaConf, ``Optional`` / ``List`` types;
    unknown keys rejected) types it: PreprocessConfig's fields, each optional (None: not set here; command-line
    options fill in and override). So one YAML file serves ``sla-dist train`` and ``sla-dist preprocess --recipe``."""

    videos: Optional[str] = None
    captions: Optional[str] = None
    out: Optional[str] = None
    vae: Optional[str] = None
    text_encoder: Optional[str] = None
    tokenizer: Optional[str] = None
    clip_shapes: Optional[List[str]] = None
    fps: Optional[float] = None
    clips_per_video: Optional[int] = None
    shard_size: Optional[int] = None
    text_len: Optional[int] = None
    text_batch: Optional[int] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    save_dtype: Optional[str] = None

    def values(self) -> dict:
        """The keys set in the section, as PreprocessConfig keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class Summary:
    """What one rank did."""

    rank: int
    world_size: int
    shards_written: list[int] = field(default_factory=list)
    shards_present: list[int] = field(default_factory=list)
    clips: int = 0
    skipped: list[dict] = field(default_factory=list)
    index_written: bool = False


def run(config: PreprocessConfig, rank: int = 0, world_size: int = 1) -> Summary:
    """Preprocess this rank's shards of ``config``; see the module docstring."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    from sla_dist.data.encoders import missing_weights

    problems = missing_weights(config.vae, config.text_encoder)
    if problems:
        raise FileNotFoundError("nothing is downloaded; the encoders must be local:\n  " + "\n  ".join(problems))
    out = Path(config.out)
    videos = list_videos(config.videos)
    if not videos:
        raise ValueError(f"--videos {config.videos!r} lists no videos (suffixes looked for: mp4, webm, mkv, ...)")
    captions = load_captions(config.captions)
    num_shards = num_blocks(len(videos), config.shard_size)
    plan = {"settings": config.settings(), "videos": videos, "num_shards": num_shards, "text_len": config.text_len}
    _write_or_check_plan(out, plan)
    summary = Summary(rank, world_size)
    mine = range(rank, num_shards, world_size)
    _remove_stale_temps(out, mine)
    pending = [i for i in mine if not shard_path(out, i).is_file()]
    summary.shards_present = [i for i in mine if i not in pending]
    if pending:
        vae, text_encoder = _load_encoders(config)
        _record_encoders(out, {"vae": vae.info, "text_encoder": text_encoder.info})
        root = Path(config.videos) if Path(config.videos).is_dir() else Path(config.videos).parent
        _encode_shards(config, videos, pending, root, captions, vae, text_encoder, summary)
    summary.index_written = build_index(out) is not None
    return summary


def _remove_stale_temps(out: Path, mine: range) -> None:
    """What a killed run left: temporary files of this rank's shards (no other rank writes them) and of the JSON
    files (any rank writes those, in well under a minute)."""
    stale = [t for i in mine for t in remove_stale_temps(shard_path(out, i))]
    for name in (PLAN_NAME, ENCODERS_NAME, INDEX_NAME):
        stale += remove_stale_temps(out / name, older_than=JSON_TEMP_AGE)
    if stale:
        print(f"removed {len(stale)} temporary files of a killed run: {', '.join(t.name for t in stale)}",
              file=sys.stderr)


def _write_or_check_plan(out: Path, plan: dict) -> None:
    """Create ``plan.json`` (exactly one racing rank does), or check that the existing one matches this run."""
    out.mkdir(parents=True, exist_ok=True)
    if write_json(out / PLAN_NAME, plan, exclusive=True):
        return
    old = read_json(out / PLAN_NAME)
    differing = [k for k in plan if k != "settings" and old.get(k) != plan[k]]
    differing += [f"settings.{k}" for k, v in plan["settings"].items() if old.get("settings", {}).get(k) != v]
    if differing:
        raise ValueError(f"--out {str(out)!r} holds a dataset made with other inputs or settings (differing: "
                         f"{differing}); rerun with the same options, or use a new --out")


def _record_encoders(out: Path, encoders: dict) -> None:
    """Store what the loaded encoders are in ``encoders.json``: the first rank to load them creates it (atomically,
    never rewritten), every later one checks it; refuse a different pair. plan.json is never rewritten."""
    recorded = read_json(out / PLAN_NAME).get("encoders")  # where datasets made before encoders.json kept them
    if recorded not in (None, json.loads(json.dumps(encoders))):
        raise ValueError(f"--out {str(out)!r} was written with encoders {recorded}, now {encoders}")
    try:
        write_json_once(out / ENCODERS_NAME, encoders, "encoders")
    except ValueError as exc:
        raise ValueError(f"--out {str(out)!r} was written with other encoders: {exc}") from exc


def _load_encoders(config: PreprocessConfig):
    from sla_dist.data.encoders import load_text_encoder, load_vae

    device = config.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[config.dtype] if config.dtype else (torch.bfloat16 if str(device).startswith("cuda")
                                                       else torch.float32)
    vae = load_vae(config.vae, device, dtype)
    for shape in config.shapes():
        vae.check_clip(shape.frames, shape.height, shape.width)
    text_encoder = load_text_encoder(config.text_encoder, config.tokenizer, config.text_len, device, dtype)
    return vae, text_encoder


def _encode_shards(config, videos, pending, root, captions, vae, text_encoder, summary: Summary) -> None:
    from tqdm import tqdm

    shapes, save_dtype = config.shapes(), DTYPES[config.save_dtype]
    total = sum(len(videos[i * config.shard_size:(i + 1) * config.shard_size]) for i in pending)
    with tqdm(total=total, desc=f"preprocess rank {summary.rank}/{summary.world_size}", unit="video",
              position=summary.rank, dynamic_ncols=True) as bar:
        for shard in pending:
            records, latents, skipped = [], [], []
            for video in videos[shard * config.shard_size:(shard + 1) * config.shard_size]:
                caption = caption_for(video, root, captions)
                try:
                    if caption is None:
                        raise ValueError("no caption in --captions")
                    clips = _read_clips(video, shapes, config)
                except Exception as exc:  # any unreadable input is reported and skipped, never fatal
                    skipped.append({"video": video, "reason": f"{type(exc).__name__}: {exc}"})
                    bar.write(f"skipping {video}: {exc}", file=sys.stderr)
                else:
                    for record, clip in clips:
                        record.caption = caption
                        z = vae.encode(clip[None])[0]
                        record.latent_shape = list(z.shape)
                        records.append(record)
                        latents.append(z.to(save_dtype).cpu())
                bar.update(1)
            texts = _encode_captions(text_encoder, [r.caption for r in records], config.text_batch)
            samples = []
            for record, z, text in zip(records, latents, texts):
                record.text_tokens = text.shape[0]
                samples.append(EncodedSample(z, text.to(save_dtype), record))
            write_shard(config.out, shard, samples, skipped)
            summary.shards_written.append(shard)
            summary.clips += len(samples)
            summary.skipped.extend(skipped)


def _read_clips(video: str, shapes: list[ClipShape],
                config: PreprocessConfig) -> list[tuple[SampleRecord, torch.Tensor]]:
    """Every clip the config asks of ``video``, with its record (caption and latent facts filled in later)."""
    info = probe(video)
    shape = choose_shape(info, shapes, config.fps)
    starts = clip_starts(info.duration, (shape.frames - 1) / config.fps, config.clips_per_video)
    return [(SampleRecord(video=video, caption="", clip_start=start, fps=config.fps, frames=shape.frames,
                          height=shape.height, width=shape.width, latent_shape=[], text_tokens=0),
             read_clip(video, shape, config.fps, start)) for start in starts]


def _encode_captions(text_encoder, captions: list[str], batch: int) -> list[torch.Tensor]:
    """Encode each distinct caption once (clips of one video share theirs)."""
    distinct = list(dict.fromkeys(captions))
    encoded = {}
    for i in range(0, len(distinct), batch):
        chunk = distinct[i:i + batch]
        encoded.update(zip(chunk, text_encoder.encode(chunk)))
    return [encoded[c] for c in captions]
