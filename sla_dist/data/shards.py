"""On-disk format of preprocessed latent shards and their index.

A preprocessed dataset is a directory::

    OUT/
      plan.json                      the run that made it: options and the ordered input list (written once)
      encoders.json                  what the encoders were (written once, by the first rank that loads them)
      shards/shard-000000.safetensors
      shards/shard-000001.safetensors
      ...
      index.json                     written once every shard exists; what the training data pipeline reads

Shard ``i`` holds the clips of the videos ``plan["videos"][i * shard_size : (i + 1) * shard_size]``, so the shard a
video lands in depends only on the input list and never on which rank encoded it (this is what makes runs
restartable and multi-process splits disjoint). Inside a shard file, sample ``j`` is the pair of tensors

- ``latents.{j}``: ``[C, T, H, W]``, the VAE posterior mean, already normalised the way the model trains on it
  (``(z - latents_mean) / latents_std`` for Wan, ``(z - shift_factor) * scaling_factor`` for ``AutoencoderKL``);
- ``text.{j}``: ``[n_j, D]``, the text encoder's last hidden state for the ``n_j`` real tokens of the caption.

Padding is not stored: the text mask of a sample is "the first ``n_j`` of ``text_len`` tokens" and the data pipeline
rebuilds the zero-padded ``[text_len, D]`` embedding and its boolean mask from ``n_j`` (Wan zero-pads its umT5
embeddings the same way). The safetensors header metadata (strings only) carries ``format``, ``version``, ``shard``,
``samples`` (a JSON list of per-sample records, see :class:`SampleRecord`) and ``skipped`` (a JSON list of
``{"video", "reason"}`` for inputs that could not be read). A shard is written to a temporary file of a unique
name (``tempfile.mkstemp`` beside it: ranks on several nodes sharing the filesystem may have equal pids), flushed to
disk (``fsync``) and renamed, so a file under its final name is always complete, also after a power loss. The
temporary files a killed run leaves are removed when the run restarts (``remove_stale_temps``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..files import save_safetensors

SHARD_FORMAT = "sla-dist-shard"
INDEX_FORMAT = "sla-dist-latents"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
PLAN_NAME = "plan.json"
ENCODERS_NAME = "encoders.json"
SHARD_DIR = "shards"


@dataclass
class SampleRecord:
    """Metadata of one encoded clip; ``latent_shape`` is ``[C, T, H, W]`` of its ``latents.{j}`` tensor."""

    video: str
    """Input path as listed in the plan."""

    caption: str
    """The caption that was encoded."""

    clip_start: float
    """Start of the clip in the source video, in seconds."""

    fps: float
    """Frame rate the clip was sampled at."""

    frames: int
    """Pixel frames of the clip (before VAE compression)."""

    height: int
    """Pixel height of the clip."""

    width: int
    """Pixel width of the clip."""

    latent_shape: list[int]
    """[C, T, H, W] of the stored latents."""

    text_tokens: int
    """Real (unpadded) caption tokens, the rows of ``text.{j}``."""

    @property
    def bucket(self) -> tuple[int, int, int]:
        """The latent (frames, height, width): samples of one bucket have one token count."""
        return tuple(self.latent_shape[1:])  # type: ignore[return-value]


@dataclass
class EncodedSample:
    """One clip ready to be written: tensors plus its record."""

    latents: torch.Tensor
    text: torch.Tensor
    record: SampleRecord


@dataclass
class ShardHeader:
    """What a shard's header says, without reading its tensors."""

    shard: int
    samples: list[SampleRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def shard_path(root: str | os.PathLike, shard: int) -> Path:
    """Path of shard ``shard`` under the dataset directory ``root``."""
    if shard < 0:
        raise ValueError(f"shard={shard} must be non-negative")
    return Path(root) / SHARD_DIR / f"shard-{shard:06d}.safetensors"


def write_shard(root: str | os.PathLike, shard: int, samples: list[EncodedSample], skipped: list[dict]) -> Path:
    """Write shard ``shard`` atomically (temporary file, then rename) and return its path."""
    tensors: dict[str, torch.Tensor] = {}
    for j, sample in enumerate(samples):
        if sample.latents.dim() != 4 or list(sample.latents.shape) != list(sample.record.latent_shape):
            raise ValueError(f"sample {j} of shard {shard}: latents of shape {tuple(sample.latents.shape)} do not "
                             f"match its record's latent_shape {sample.record.latent_shape}")
        if sample.text.dim() != 2 or sample.text.shape[0] != sample.record.text_tokens:
            raise ValueError(f"sample {j} of shard {shard}: text of shape {tuple(sample.text.shape)} must be "
                             f"[text_tokens={sample.record.text_tokens}, D]")
        tensors[f"latents.{j}"] = sample.latents.detach().cpu().contiguous()
        tensors[f"text.{j}"] = sample.text.detach().cpu().contiguous()
    metadata = {
        "format": SHARD_FORMAT,
        "version": str(FORMAT_VERSION),
        "shard": str(shard),
        "samples": json.dumps([asdict(s.record) for s in samples]),
        "skipped": json.dumps(skipped),
    }
    path = shard_path(root, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        save_safetensors(tensors, tmp, metadata=metadata)
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _temp_beside(path: Path) -> Path:
    """A new, uniquely named empty file in ``path``'s directory (unique across processes and hosts)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path, exclusive: bool = False) -> bool:
    """Give the finished temporary file ``tmp`` its final name ``path``: its data reaches the disk before the rename
    (else a crash could leave a complete-looking name over missing data), the directory entry after it. With
    ``exclusive``, only if ``path`` does not exist yet; returns whether ``path`` is now ``tmp``'s data."""
    _fsync(tmp)
    if exclusive:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    else:
        os.replace(tmp, path)
    _fsync(path.parent)
    return True


def remove_stale_temps(path: str | os.PathLike, older_than: float = 0.0) -> list[Path]:
    """Remove the temporary files of ``path`` (``.NAME.*.tmp`` beside it) that a killed writer left, and return them.

    Only for files no other live process may be writing: a rank's own shards (shards belong to one rank), or with
    ``older_than`` seconds for the small JSON files any rank writes in an instant."""
    path = Path(path)
    now, removed = time.time(), []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime >= older_than:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # its writer finished (or another restart removed it) meanwhile
            pass
    return removed


def read_shard_header(path: str | os.PathLike) -> ShardHeader:
    """Parse a shard's header metadata; ValueError if the file is not a shard of this format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{str(path)!r} is not a readable safetensors shard: {exc}") from exc
    if meta.get("format") != SHARD_FORMAT or meta.get("version") != str(FORMAT_VERSION):
        raise ValueError(f"{str(path)!r} has format={meta.get('format')!r} version={meta.get('version')!r}; "
                         f"expected {SHARD_FORMAT!r} version {FORMAT_VERSION}")
    return ShardHeader(shard=int(meta["shard"]),
                       samples=[SampleRecord(**s) for s in json.loads(meta["samples"])],
                       skipped=json.loads(meta["skipped"]))


def write_json(path: str | os.PathLike, obj: dict, exclusive: bool = False) -> bool:
    """Write JSON atomically, so that concurrent writers of identical content and readers never see a partial file.

    With ``exclusive``, write only if ``path`` does not exist yet (atomically: of racing writers exactly one wins);
    returns whether this call wrote the file. The temporary file has a unique name, so racing writers (also on
    other hosts of a shared filesystem) never touch each other's.
    """
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        return _commit(tmp, path, exclusive)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_once(path: str | os.PathLike, obj: dict, what: str) -> bool:
    """Create ``path`` with ``obj`` if it does not exist (atomically; of racing writers one wins), else check that
    it holds ``obj``: ValueError naming ``what`` differs. Returns whether this call wrote the file; an existing file
    is never rewritten."""
    if write_json(path, obj, exclusive=True):
        return True
    old = read_json(path)
    if old != json.loads(json.dumps(obj)):
        raise ValueError(f"{str(path)!r} records other {what}: {old}, now {obj}")
    return False


def build_index(root: str | os.PathLike) -> dict | None:
    """Write ``index.json`` if every shard the plan asks for exists; return the index, or None if shards are missing.

    Idempotent and deterministic (the index depends only on the plan and the shard files), so every preprocessing
    rank may call it when it finishes and the last one to finish writes it.
    """
    root = Path(root)
    plan = read_json(root / PLAN_NAME)
    num_shards = int(plan["num_shards"])
    paths = [shard_path(root, i) for i in range(num_shards)]
    if not all(p.is_file() for p in paths):
        return None
    encoders_path = root / ENCODERS_NAME  # absent in datasets made before it (their plan has "encoders")
    shards, skipped, buckets = [], [], {}
    for i, p in enumerate(paths):
        header = read_shard_header(p)
        if header.shard != i:
            raise ValueError(f"{str(p)!r} says it is shard {header.shard}, expected {i}")
        shards.append({"file": str(p.relative_to(root)), "samples": [asdict(s) for s in header.samples]})
        skipped.extend(header.skipped)
        for s in header.samples:
            key = "x".join(map(str, s.bucket))
            buckets[key] = buckets.get(key, 0) + 1
    index = {
        "format": INDEX_FORMAT,
        "version": FORMAT_VERSION,
        "num_samples": sum(len(s["samples"]) for s in shards),
        "buckets": dict(sorted(buckets.items())),
        "text_len": plan["text_len"],
        "encoders": read_json(encoders_path) if encoders_path.is_file() else plan.get("encoders"),
        "shards": shards,
        "skipped": skipped,
    }
    write_json(root / INDEX_NAME, index)
    return index


def read_json(path: str | os.PathLike) -> dict:
    """Load a JSON file of the dataset directory, naming it in the error if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from exc


def load_index(root: str | os.PathLike) -> dict:
    """Read and check ``root/index.json`` (FileNotFoundError says to run ``sla-dist preprocess`` to the end)."""
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: {str(root)!r} is not a finished preprocessed dataset "
                                "(run `sla-dist preprocess ... --out DIR` until every rank has finished)")
    index = read_json(path)
    if index.get("format") != INDEX_FORMAT or index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has format={index.get('format')!r} version={index.get('version')!r}; "
                         f"expected {INDEX_FORMAT!r} version {FORMAT_VERSION}")
    return index
