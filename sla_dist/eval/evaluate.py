"""Evaluate one or more checkpoints side by side: samples, validation flow loss, FVD, CLIP score, attention fidelity.

Data come from the recipe's data section. For the built-in synthetic set every evaluation sample is held out: the
set is a pure function of (seed, index), so indices past ``data.num_samples`` (never trained on) give the prompts,
the validation batch and, unless a reference directory is given, the FVD reference videos (a further disjoint
slice). Latents become pixels through the set's ``LatentCodec.decode`` (its fixed RGB mixing undone); for latent
shards, which need a real VAE to decode, the first three latent channels in [-1, 1] are shown as RGB — a viewing
aid only, so FVD / CLIP numbers of shard data are not comparable with published ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..lightning.data import build_datamodule
from ..lightning.recipe import Recipe, load_recipe
from ..lightning.summary import plot_loss, read_curves
from .checkpoints import load_model, sla_layers
from .clip import clip_score, local_clip
from .fidelity import FidelityConfig, attention_fidelity
from .flow_loss import validation_loss
from .fvd import VideoFVD, build_extractor
from .report import plot_fidelity, write_report
from ..sampling import SamplerConfig, sample
from .videos import has_mp4_writer, read_video_dir, upscale, write_grid, write_mp4, write_tensor_video

MP4_MIN_SIDE = 128  # latent-resolution videos are upscaled (nearest) to at least this for viewing


@dataclass
class EvalConfig:
    """One ``sla-dist eval`` run."""

    checkpoints: list[str]
    """Checkpoints to compare: DeepSpeed directories, Lightning ``.ckpt`` files or exported ``.safetensors``."""

    out_dir: str
    """Where report.json, report.md, plots and per-checkpoint sample videos go."""

    recipes: list[str] = field(default_factory=list)
    """Fallback recipes for checkpoints whose run saved none: one for all, or one per checkpoint. A checkpoint of a
    training run is evaluated with that run's own ``recipe.yaml`` (see :func:`saved_recipe`)."""

    names: list[str] | None = None
    """Column names of the checkpoints (default: file names, made unique)."""

    overrides: list[str] = field(default_factory=list)
    """key=value recipe overrides applied to every recipe."""

    reference: str | None = None
    """Directory of reference videos for FVD (.mp4 / .safetensors); None: held-out synthetic videos."""

    i3d: str | None = None
    """Path of the I3D TorchScript detector; None: the random 3D-conv extractor."""

    clip: str | None = None
    """Local CLIP directory for the CLIP score; None: no CLIP score."""

    num_videos: int = 16
    """Videos sampled per checkpoint (also the number of generated videos FVD sees)."""

    reference_videos: int = 64
    """Held-out synthetic reference videos for FVD when no reference directory is given."""

    val_samples: int = 32
    """Held-out samples of the validation flow-matching loss."""

    batch_size: int | None = None
    """Videos per model call when sampling (and samples per validation-loss batch); None: the recipe's
    ``data.batch_size``. Results do not depend on it (each video's noise is seeded by its index)."""

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)

    ema: bool = False
    """Evaluate the EMA weights of Lightning / DeepSpeed checkpoints."""

    device: str = "cpu"
    """Torch device of the model."""

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("give at least one checkpoint")
        if len(self.recipes) not in (0, 1, len(self.checkpoints)):
            raise ValueError(f"{len(self.recipes)} recipes for {len(self.checkpoints)} checkpoints: give one "
                             "recipe, or one per checkpoint")
        if self.names is not None and (len(self.names) != len(self.checkpoints) or len(set(self.names)) !=
                                       len(self.names)):
            raise ValueError(f"names={self.names} must be {len(self.checkpoints)} distinct names")
        for name in self.names or ():
            # each name is a folder of out_dir: a path ("../x", "/tmp/x", "a/b") would write elsewhere
            if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
                raise ValueError(f"name {name!r} is not a plain file name (no '/', no '..')")
        for name in ("num_videos", "reference_videos"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 2 (FVD needs a covariance)")
        if self.val_samples < 1:
            raise ValueError(f"val_samples={self.val_samples} must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be positive")

    def recipe_paths(self) -> list[str]:
        """The recipe of each checkpoint: its run's saved ``recipe.yaml``, else the given one for it.

        Raises ValueError naming the checkpoints that have neither."""
        given = self.recipes * len(self.checkpoints) if len(self.recipes) == 1 else list(self.recipes)
        found = [saved_recipe(c) for c in self.checkpoints]
        paths = [str(s) if s is not None else (given[i] if given else None) for i, s in enumerate(found)]
        missing = [c for c, p in zip(self.checkpoints, paths) if p is None]
        if missing:
            raise ValueError(f"no recipe for {missing}: neither RUN/recipe.yaml beside the checkpoint nor --recipe")
        return paths

    def run_names(self) -> list[str]:
        if self.names is not None:
            return list(self.names)
        stems = [Path(c).stem for c in self.checkpoints]
        return stems if len(set(stems)) == len(stems) else [f"{i}_{s}" for i, s in enumerate(stems)]


def saved_recipe(checkpoint: str | Path) -> Path | None:
    """The ``recipe.yaml`` that ``sla-dist train`` saved for the run of ``checkpoint``, or None.

    A training checkpoint lives in ``RUN/checkpoints/`` (a file or a DeepSpeed directory) and its recipe in ``RUN/``;
    an exported file may also sit in ``RUN/`` itself. Only these two places are looked at, so a file elsewhere never
    picks up an unrelated recipe."""
    where = Path(checkpoint).absolute().parent
    if where.name == "checkpoints":
        where = where.parent
    recipe = where / "recipe.yaml"
    return recipe if recipe.is_file() else None


class EvalData:
    """Held-out prompts, text embeddings, latents and the latent -> pixel projection of a recipe's data."""

    def __init__(self, recipe: Recipe, config: EvalConfig) -> None:
        wanted = max(config.num_videos, config.val_samples)
        self.synthetic = recipe.data.kind == "synthetic"
        start = recipe.data.num_samples if self.synthetic else 0
        count = wanted + (config.reference_videos if self.synthetic else 0)
        data = dataclasses.replace(recipe.data, num_samples=start + count) if self.synthetic else recipe.data
        self.dataset = build_datamodule(data, recipe.dit, recipe.seed).build_dataset()
        if len(self.dataset) < start + wanted:
            raise ValueError(f"the recipe's data hold {len(self.dataset)} samples; evaluation needs {wanted}")
        self.eval_indices = list(range(start, start + wanted))
        self.reference_indices = list(range(start + wanted, start + count))

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.dataset[i] for i in indices]
        shapes = {tuple(item["latents"].shape) for item in items}
        if len(shapes) > 1:
            raise ValueError(f"evaluation samples mix latent shapes {sorted(shapes)}; use data of one shape")
        return torch.stack([it["latents"] for it in items]), torch.stack([it["text"] for it in items])

    def caption(self, index: int) -> str:
        return self.dataset.caption(index) if self.synthetic else self.dataset.records[index].caption

    def to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, C, T, H, W] latents -> [N, 3, T, H, W] in [0, 1]."""
        if self.synthetic:
            return self.dataset.codec.decode(latents.float().cpu())
        return ((latents[:, :3].float().cpu().clamp(-1, 1) + 1) / 2)


def sample_videos(model: torch.nn.Module, text: torch.Tensor, shape: tuple[int, int, int, int],
                  config: SamplerConfig, batch_size: int, null_text: torch.Tensor | None = None) -> torch.Tensor:
    """``sample`` over text embeddings [N, Lt, text_dim] in batches of at most ``batch_size`` videos (a whole
    evaluation set in one call does not fit in memory at Wan size); video i is the same for any batch size."""
    return torch.cat([sample(model, text[start: start + batch_size], shape, config, null_text=null_text,
                             first_index=start) for start in range(0, text.shape[0], batch_size)])


def evaluate_checkpoint(path: str, name: str, recipe_path: str, recipe: Recipe, data: EvalData, config: EvalConfig,
                        fvd: VideoFVD, out_dir: Path) -> dict:
    """Everything measured for one checkpoint; sample videos go to ``out_dir / name``."""
    model = load_model(path, recipe, ema=config.ema, device=config.device)
    latents, text = data.batch(data.eval_indices)
    prompt_ids = data.eval_indices[:config.num_videos]
    sampler = dataclasses.replace(config.sampler, shift=recipe.optim.flow_shift)
    batch_size = config.batch_size or recipe.data.batch_size
    generated = sample_videos(model, text[:config.num_videos], tuple(latents.shape[1:]), sampler, batch_size,
                              null_text=torch.zeros_like(text[:1]))
    videos = data.to_pixels(generated)
    run_dir = out_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob("video_*"):  # an earlier evaluation's videos would pass for this one's
        stale.unlink()
    viewable = upscale(videos, MP4_MIN_SIDE)
    written = []
    for i, video in enumerate(videos):
        written.append(f"video_{i:03d}.safetensors")
        write_tensor_video(video, run_dir / written[-1])
        if has_mp4_writer():
            written.append(f"video_{i:03d}.mp4")
            write_mp4(viewable[i], run_dir / written[-1])
    write_grid(viewable, run_dir / "grid.png")
    prompts = [data.caption(i) for i in prompt_ids]
    score = None
    if config.clip is not None:
        score = clip_score(videos, prompts, local_clip(config.clip))
    state_layers = sla_layers(model.state_dict())
    return {
        "path": str(path), "recipe": recipe_path, "sla_layers": state_layers,
        "val_loss": validation_loss(model, latents[:config.val_samples], text[:config.val_samples],
                                    shift=recipe.optim.flow_shift, seed=config.sampler.seed,
                                    batch_size=batch_size),
        "fvd": fvd(videos), "clip_score": score,
        "fidelity": attention_fidelity(model, latents[:2], text[:2], config.fidelity, sla=recipe.sla),
        "grid": f"{name}/grid.png", "prompts": prompts,
        "videos": sorted(written),
    }


def evaluate(config: EvalConfig) -> dict:
    """Run the whole evaluation and write the report; returns the report dict."""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe_paths = config.recipe_paths()
    recipes = [load_recipe(r, config.overrides) for r in recipe_paths]
    for path, recipe in zip(recipe_paths[1:], recipes[1:]):
        if (recipe.data, recipe.seed) != (recipes[0].data, recipes[0].seed):
            raise ValueError(f"recipe {path!r} has other data (or seed) than {recipe_paths[0]!r}; checkpoints "
                             "compared side by side are evaluated on one data set")
    data = EvalData(recipes[0], config)
    notes: list[str] = []
    extractor = build_extractor(config.i3d, seed=config.sampler.seed).to(config.device)
    if config.reference is not None:
        reference = read_video_dir(config.reference)
        reference_name = config.reference
    else:
        if not data.synthetic:
            raise ValueError("data.kind='shards' has no built-in reference videos: pass --reference DIR")
        reference = data.to_pixels(data.batch(data.reference_indices)[0])
        reference_name = f"{len(reference)} held-out synthetic videos"
    fvd = VideoFVD(extractor, reference)
    if config.i3d is None:
        notes.append("FVD uses the seeded random 3D-conv extractor: compare its values only within this report "
                     "(pass --i3d PATH for the standard I3D FVD).")
    if not has_mp4_writer():
        notes.append("mp4 videos were not written: PyAV is not installed (pip install av); the exact "
                     ".safetensors videos and grid.png were.")
    runs = {}
    for path, name, recipe_path, recipe in zip(config.checkpoints, config.run_names(), recipe_paths, recipes):
        runs[name] = evaluate_checkpoint(path, name, recipe_path, recipe, data, config, fvd, out_dir)
    report = {"sampler": dataclasses.asdict(config.sampler), "fvd_extractor": type(extractor).__name__,
              "reference": reference_name, "checkpoints": runs, "fidelity_plot": None, "notes": notes}
    if plot_fidelity({name: run["fidelity"] for name, run in runs.items()}, out_dir / "fidelity.png"):
        report["fidelity_plot"] = "fidelity.png"
    else:
        notes.append("the attention-fidelity plot was not drawn: matplotlib is not installed (pip install "
                     "matplotlib); the table above has the same numbers.")
    curves = training_curves(dict(zip(config.run_names(), config.checkpoints)))
    report["training_curves"] = "training_curves.png" if plot_loss(curves, out_dir / "training_curves.png") else None
    write_report(report, out_dir)
    return report


def training_curves(checkpoints: dict[str, str]) -> dict[str, list]:
    """{"NAME train/loss" / "NAME val/flow": [(step, value), ...]} from the CSV log of each checkpoint's run
    (``RUN/logs/csv/version_N/metrics.csv``, the newest version); runs without a log add nothing."""
    curves: dict[str, list] = {}
    for name, checkpoint in checkpoints.items():
        recipe = saved_recipe(checkpoint)
        logs = [] if recipe is None else list((recipe.parent / "logs" / "csv").glob("version_*/metrics.csv"))
        if logs:
            newest = max(logs, key=lambda p: int(p.parent.name.removeprefix("version_")))
            curves.update({f"{name} {key}": points for key, points in read_curves(newest).items() if points})
    return curves
