"""The VAE and text encoder of a video DiT, loaded from local directories only (nothing is ever downloaded).

- VAE: any diffusers autoencoder whose ``config.json`` names its class (``_class_name``), e.g.
  ``AutoencoderKLWan`` (Wan 2.1/2.2), ``AutoencoderKLCogVideoX``, ``AutoencoderKLHunyuanVideo``, or the image
  ``AutoencoderKL`` (frames are then encoded one by one). Latents are the posterior mean, normalised as the
  pipeline of that model does before denoising.
- Text encoder: a transformers T5-family encoder (``UMT5EncoderModel`` for Wan, ``T5EncoderModel``,
  ``MT5EncoderModel``) and its tokenizer; the embedding of a caption is the last hidden state of its real tokens.

Either path may also be the root of a diffusers pipeline directory (with ``vae/``, ``text_encoder/`` and
``tokenizer/`` subfolders), e.g. a local copy of ``Wan2.1-T2V-1.3B-Diffusers``. Weights are read from safetensors
only (``use_safetensors=True``): pickled ``*.bin`` checkpoints can run code when loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# model_type in a transformers config.json -> the encoder-only class to load it with (ignores decoder weights)
TEXT_ENCODER_CLASSES = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel", "mt5": "MT5EncoderModel"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")

VAE_NEEDS = ("a local directory holding a diffusers VAE: config.json (with _class_name, e.g. AutoencoderKLWan) and "
             "diffusion_pytorch_model.safetensors, e.g. the vae/ folder of a local Wan2.1-T2V-1.3B-Diffusers copy")
TEXT_NEEDS = ("a local directory holding a transformers T5-family encoder: config.json (model_type umt5, t5 or mt5) "
              "and model.safetensors, with its tokenizer (tokenizer.json / spiece.model) beside it or in a sibling "
              "tokenizer/ folder (--tokenizer), e.g. the text_encoder/ folder of a local Wan2.1-T2V-1.3B-Diffusers "
              "copy")


def model_dir(path: str | Path | None, subfolder: str, option: str, needs: str) -> Path:
    """The directory with config.json: ``path`` itself or its ``subfolder`` (a pipeline root)."""
    if path is None or str(path) == "":
        raise FileNotFoundError(f"{option} is required: {needs}")
    path = Path(path)
    for candidate in (path, path / subfolder):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{option} {str(path)!r} has no config.json (nor {subfolder}/config.json); it must be "
                            f"{needs}")


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def require_safetensors(directory: str | Path, what: str) -> None:
    """Refuse a model directory without ``*.safetensors`` weights, naming it: ValueError if it holds only pickled
    weights (``*.bin``: loading a pickle can execute code, so they are never read), FileNotFoundError if none."""
    directory = Path(directory)
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in directory.glob(pattern))
    if pickled:
        raise ValueError(f"{what} {str(directory)!r} holds only pickled weights ({', '.join(pickled[:3])}), which "
                         "are not loaded (unpickling can execute code); convert them to safetensors, e.g. "
                         "from_pretrained + save_pretrained once where you trust the file")
    raise FileNotFoundError(f"{what} {str(directory)!r} holds no weights (*.safetensors)")


def missing_weights(vae: str | Path | None, text_encoder: str | Path | None) -> list[str]:
    """One message per encoder directory that is not given or not found, saying what it must hold."""
    problems = []
    for path, sub, option, needs in ((vae, "vae", "--vae", VAE_NEEDS),
                                     (text_encoder, "text_encoder", "--text-encoder", TEXT_NEEDS)):
        try:
            model_dir(path, sub, option, needs)
        except FileNotFoundError as exc:
            problems.append(str(exc))
    return problems


@dataclass
class VideoVAE:
    """A loaded diffusers VAE with the facts preprocessing needs about it."""

    model: nn.Module
    temporal_factor: int
    """Frames per latent frame after the first (causal video VAEs take 1 + k * factor frames); 1 for image VAEs."""
    spatial_factor: int
    """Pixels per latent pixel along height and width."""
    image: bool
    """True for a 2D VAE: frames are folded into the batch."""
    mean: torch.Tensor
    """Per-channel (or scalar) shift subtracted from raw latents."""
    scale: torch.Tensor
    """Per-channel (or scalar) factor applied after the shift."""
    info: dict = field(default_factory=dict)
    """What the plan records about this VAE."""

    def check_clip(self, frames: int, height: int, width: int) -> None:
        """ValueError unless a clip of this pixel size encodes without cropping or padding."""
        if self.temporal_factor > 1 and (frames - 1) % self.temporal_factor:
            nearest = 1 + self.temporal_factor * max(1, round((frames - 1) / self.temporal_factor))
            raise ValueError(f"clip frames={frames} must be 1 + k * {self.temporal_factor} for {self.info['class']} "
                             f"(e.g. {nearest})")
        for name, value in (("height", height), ("width", width)):
            if value % self.spatial_factor:
                raise ValueError(f"clip {name}={value} must be a multiple of {self.info['class']}'s spatial factor "
                                 f"{self.spatial_factor}")

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, C, T, h, w] (float32)."""
        param = next(self.model.parameters())
        x = video.to(device=param.device, dtype=param.dtype)
        b, _, f = x.shape[:3]
        if self.image:
            x = x.transpose(1, 2).flatten(0, 1)  # [B * F, 3, H, W]
        out = self.model.encode(x)
        dist = out.latent_dist if hasattr(out, "latent_dist") else out[0]
        z = dist.mean.float()
        if self.image:
            z = z.unflatten(0, (b, f)).transpose(1, 2)
        shape = [1, -1] + [1] * (z.dim() - 2)
        return (z - self.mean.to(z.device).view(shape)) * self.scale.to(z.device).view(shape)


def load_vae(path: str | Path | None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> VideoVAE:
    """Load the VAE from ``path`` (its directory or a pipeline root), frozen, in eval mode."""
    import diffusers

    directory = model_dir(path, "vae", "--vae", VAE_NEEDS)
    config = json.loads((directory / "config.json").read_text())
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "encode"):
        raise ValueError(f"--vae {str(directory)!r}: _class_name={name!r} is not a diffusers autoencoder class")
    require_safetensors(directory, "--vae")
    model = cls.from_pretrained(str(directory), torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    model = model.to(device).eval().requires_grad_(False)
    conv_in = getattr(getattr(model, "encoder", None), "conv_in", None)
    image = type(conv_in) is nn.Conv2d  # 3D / causal convs subclass Conv3d or wrap one
    temporal = 1 if image else int(config.get("scale_factor_temporal") or config.get("temporal_compression_ratio")
                                   or 1)
    spatial = int(config.get("scale_factor_spatial") or config.get("spatial_compression_ratio")
                  or 2 ** (len(config.get("block_out_channels", [0])) - 1))
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean = torch.tensor(config["latents_mean"], dtype=torch.float32)
        scale = 1.0 / torch.tensor(config["latents_std"], dtype=torch.float32)
        norm = {"latents_mean": config["latents_mean"], "latents_std": config["latents_std"]}
    else:
        shift, factor = config.get("shift_factor") or 0.0, config.get("scaling_factor") or 1.0
        mean, scale = torch.tensor([float(shift)]), torch.tensor([float(factor)])
        norm = {"shift_factor": shift, "scaling_factor": factor}
    info = {"path": str(directory), "class": name, "temporal_factor": temporal, "spatial_factor": spatial,
            "normalization": norm}
    return VideoVAE(model, temporal, spatial, image, mean, scale, info)


@dataclass
class TextEncoder:
    """A loaded T5-family encoder and tokenizer; captions are padded/truncated to ``max_length`` tokens."""

    model: nn.Module
    tokenizer: object
    max_length: int
    info: dict = field(default_factory=dict)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        """Captions -> one [n_i, D] float32 tensor each, the hidden states of its n_i real tokens."""
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return [h[:n].cpu() for h, n in zip(hidden, mask.sum(1).tolist())]


def load_text_encoder(path: str | Path | None, tokenizer: str | Path | None = None, max_length: int = 512,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TextEncoder:
    """Load the text encoder from ``path`` (its directory or a pipeline root) and its tokenizer (``tokenizer``,
    else beside the model, else a sibling ``tokenizer/`` folder)."""
    import transformers

    if max_length <= 0:
        raise ValueError(f"max_length={max_length} must be positive")
    directory = model_dir(path, "text_encoder", "--text-encoder", TEXT_NEEDS)
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type not in TEXT_ENCODER_CLASSES:
        raise ValueError(f"--text-encoder {str(directory)!r}: model_type={model_type!r} is not one of "
                         f"{sorted(TEXT_ENCODER_CLASSES)}")
    tok_dir = Path(tokenizer) if tokenizer is not None else next(
        (d for d in (directory, directory.parent / "tokenizer") if any((d / f).is_file() for f in TOKENIZER_FILES)),
        None)
    if tok_dir is None or not tok_dir.is_dir():
        raise FileNotFoundError(f"no tokenizer for --text-encoder {str(directory)!r}: expected one of "
                                f"{TOKENIZER_FILES} beside it or in {str(directory.parent / 'tokenizer')!r}, or pass "
                                f"--tokenizer DIR (got {None if tokenizer is None else str(tokenizer)!r})")
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    cls = getattr(transformers, TEXT_ENCODER_CLASSES[model_type])
    require_safetensors(directory, "--text-encoder")
    model = cls.from_pretrained(str(directory), dtype=dtype, local_files_only=True, use_safetensors=True)
    model = model.to(device).eval().requires_grad_(False)
    info = {"path": str(directory), "tokenizer": str(tok_dir), "class": cls.__name__, "max_length": max_length,
            "dim": model.config.d_model}
    return TextEncoder(model, tok, max_length, info)
