"""Image autoencoders for latent diffusion: a diffusers ``VQModel`` or ``AutoencoderKL`` behind one interface.

:class:`Autoencoder` maps images in ``data_range`` (default [0, 1]) to an *unscaled* latent and back:

    encode(x) = E(x)                       (VQ: pre-quantisation latent after quant_conv; KL: posterior mean)
    decode(z) = D(q(z))                    (VQ: q = nearest codebook vector, straight-through gradient dq/dz = I;
                                            KL: q = identity)

The diffusers model works on [-1, 1]; the affine map x_model = -1 + 2 (x - lo) / (hi - lo) and its inverse are
applied inside ``encode`` / ``decode`` (:func:`~diffinv_pl.utils.ranges.convert_range`). A latent of an image of
(C, H, W) has shape (latent_channels, H / f, W / f), f = 2 ** (number of resolution levels - 1).

Grayscale (``channel_mode``), chosen explicitly, never guessed from data:

* ``native``: the model takes and returns ``image_channels`` channels (1 for a one-channel model trained on
  grayscale, 3 for RGB).
* ``gray_to_rgb``: one-channel data with an RGB model (e.g. a pretrained RGB checkpoint): the gray image g is fed as
  (g, g, g) and the RGB output is averaged back, x_out = (r + g + b) / 3. The map is exact for gray outputs: a model
  returning three identical channels returns that channel.

:func:`load_autoencoder` reads a diffusers folder (``save_pretrained``: ``config.json`` + weights; the class comes
from ``_class_name``) or an ``AutoencoderTask`` checkpoint (``.ckpt``, EMA weights; the description stored under
``checkpoint["diffinv_pl"]``). It never falls back to random weights. :func:`build_autoencoder` makes a fresh model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, VQModel
from torch import Tensor, nn

from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.utils.ranges import SYMMETRIC, UNIT, convert_range

KINDS = {"vq": VQModel, "kl": AutoencoderKL}
CLASS_KINDS = {"VQModel": "vq", "AutoencoderKL": "kl"}
CHANNEL_MODES = ("native", "gray_to_rgb")
CHECKPOINT_FORMAT = "diffinv_pl.autoencoder/1"
SIDECAR_NAME = "diffinv_autoencoder.json"  # channel mode / data range written next to an exported diffusers folder
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DESCRIPTION_KEYS = (
    "kind", "image_channels", "model_channels", "channel_mode", "latent_channels", "downsample_factor", "data_range"
)


class Autoencoder(nn.Module):
    """A diffusers VQ or KL autoencoder seen from data space (module docstring).

    Args:
        model: a ``diffusers.VQModel`` or ``diffusers.AutoencoderKL``.
        image_channels: channels of the user's data (default: the model's input channels, or 1 with gray_to_rgb).
        channel_mode: ``native`` | ``gray_to_rgb`` (None: ``gray_to_rgb`` when image_channels is 1 and the model
            takes 3 channels, else ``native``).
        data_range: (lo, hi) of the images given to ``encode`` and returned by ``decode``.
    """

    def __init__(
        self,
        model: nn.Module,
        image_channels: int | None = None,
        channel_mode: str | None = None,
        data_range: Sequence[float] = UNIT,
    ) -> None:
        super().__init__()
        kind = next((k for k, cls in KINDS.items() if isinstance(model, cls)), None)
        if kind is None:
            raise TypeError(f"model must be a diffusers VQModel or AutoencoderKL, got {type(model).__name__}")
        self.model = model
        self.kind = kind
        self.model_channels = int(model.config.in_channels)
        if int(model.config.out_channels) != self.model_channels:
            raise UserError(
                f"the autoencoder takes {self.model_channels} channel(s) but returns {model.config.out_channels}: "
                "use a model with in_channels == out_channels"
            )
        if channel_mode is None:
            channel_mode = "gray_to_rgb" if image_channels == 1 and self.model_channels == 3 else "native"
        if channel_mode not in CHANNEL_MODES:
            raise UserError(f"model.channel_mode={channel_mode!r} is unknown: use one of {', '.join(CHANNEL_MODES)}")
        if image_channels is None:
            image_channels = 1 if channel_mode == "gray_to_rgb" else self.model_channels
        if channel_mode == "native" and image_channels != self.model_channels:
            raise UserError(
                f"image_channels={image_channels} but the autoencoder takes {self.model_channels} channel(s) with "
                f"channel_mode=native: use a {image_channels}-channel model, or channel_mode=gray_to_rgb for "
                "grayscale data with an RGB model"
            )
        if channel_mode == "gray_to_rgb" and (image_channels != 1 or self.model_channels != 3):
            raise UserError(
                f"channel_mode=gray_to_rgb needs 1-channel data and a 3-channel model, got image_channels="
                f"{image_channels} and a {self.model_channels}-channel model: use channel_mode=native"
            )
        lo, hi = (float(v) for v in data_range)
        if not hi > lo:
            raise UserError(f"data_range must be an increasing interval (lo, hi), got {tuple(data_range)}")
        self.image_channels = int(image_channels)
        self.channel_mode = channel_mode
        self.data_range = (lo, hi)
        vq_dim = model.config.vq_embed_dim if kind == "vq" else None  # VQ: the codebook's width, if set
        self.latent_channels = int(vq_dim or model.config.latent_channels)
        self.downsample_factor = 2 ** (len(model.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------------------ data <-> model
    def to_model(self, x: Tensor) -> Tensor:
        """Images (B, image_channels, H, W) in data_range -> model input (B, model_channels, H, W) in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise UserError(
                f"the autoencoder expects images of shape (B, {self.image_channels}, H, W), got {tuple(x.shape)}: "
                "give images with its channel count (see channel_mode)"
            )
        x = convert_range(x, self.data_range, SYMMETRIC)
        return x.expand(-1, 3, -1, -1) if self.channel_mode == "gray_to_rgb" else x

    def from_model(self, y: Tensor) -> Tensor:
        """Model output (B, model_channels, H, W) in [-1, 1] -> images in data_range (gray_to_rgb: channel mean)."""
        if self.channel_mode == "gray_to_rgb":
            y = y.mean(dim=1, keepdim=True)
        return convert_range(y, SYMMETRIC, self.data_range)

    # ------------------------------------------------------------------------------------------------ interface
    def encode(self, x: Tensor) -> Tensor:
        """Images in data_range -> unscaled latent (B, latent_channels, H/f, W/f) (module docstring)."""
        self.latent_shape(tuple(x.shape[1:]))
        return self.encode_model(self.to_model(x))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent -> images in data_range; differentiable (VQ: straight-through quantisation)."""
        return self.from_model(self.decode_model(z)[0])

    def encode_model(self, x_model: Tensor) -> Tensor:
        """Model-space images -> unscaled latent (VQ: before the codebook; KL: posterior mean)."""
        if self.kind == "vq":
            return self.model.encode(x_model).latents
        return self.model.encode(x_model).latent_dist.mean

    def decode_model(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Unscaled latent -> (model-space images, VQ codebook + 0.25 commitment loss (scalar; 0 for KL))."""
        if self.kind == "vq":
            out = self.model.decode(z)
            return out.sample, out.commit_loss.mean()
        return self.model.decode(z).sample, z.new_zeros(())

    def reconstruct_model(self, x_model: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Training pass in model space: (reconstruction, regulariser). VQ: decode(encode(x)) and the codebook +
        commitment loss ||sg[z] - q||^2 + 0.25 ||z - sg[q]||^2 (element means). KL: decode of a posterior sample
        z = mu + sigma n, n from ``generator``, and KL(q(z|x) || N(0, I)) summed over latent elements, averaged over
        the batch (nats per image)."""
        if self.kind == "vq":
            return self.decode_model(self.encode_model(x_model))
        posterior = self.model.encode(x_model).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator, device=x_model.device, dtype=x_model.dtype)
        z = posterior.mean + posterior.std * noise
        return self.model.decode(z).sample, posterior.kl().mean()

    def forward(self, x: Tensor) -> Tensor:
        """decode(encode(x)): the deterministic reconstruction in data_range."""
        return self.decode(self.encode(x))

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(latent_channels, H/f, W/f) for images of shape (C, H, W); UserError if C or the size does not fit."""
        c, h, w = (int(v) for v in image_shape)
        f = self.downsample_factor
        if c != self.image_channels:
            raise UserError(
                f"images have {c} channel(s) but the autoencoder takes {self.image_channels}: convert the data "
                "(e.g. data mode L / RGB) or use an autoencoder with another channel_mode"
            )
        if h % f or w % f:
            raise UserError(
                f"image size {h}x{w} is not divisible by the autoencoder's downsample factor {f}: crop or resize"
            )
        return (self.latent_channels, h // f, w // f)

    def describe(self) -> dict[str, Any]:
        """Plain description used to check that a latent model and an autoencoder belong together."""
        return {
            "kind": self.kind,
            "image_channels": self.image_channels,
            "model_channels": self.model_channels,
            "channel_mode": self.channel_mode,
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
            "data_range": list(self.data_range),
        }

    def architecture(self) -> dict[str, Any]:
        """The diffusers config (public keys, plain JSON values) that rebuilds the model with ``from_config``."""
        return json.loads(json.dumps({k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}))


def build_autoencoder(
    kind: str = "vq",
    image_channels: int = 3,
    channel_mode: str = "native",
    block_out_channels: Sequence[int] = (128, 256, 512),
    layers_per_block: int = 2,
    latent_channels: int = 3,
    num_vq_embeddings: int = 8192,
    norm_num_groups: int = 32,
    mid_block_add_attention: bool = True,
    data_range: Sequence[float] = UNIT,
    seed: int = 0,
) -> Autoencoder:
    """A fresh diffusers autoencoder (random weights seeded by ``seed``, the global RNG untouched).

    Levels: one ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` per entry of ``block_out_channels`` (downsample
    factor 2 ** (levels - 1)); ``mid_block_add_attention`` puts self-attention in the middle block. The model takes
    3 channels with ``gray_to_rgb``, else ``image_channels``.
    """
    if kind not in KINDS:
        raise UserError(f"model.kind={kind!r} is unknown: use one of {', '.join(KINDS)}")
    if channel_mode not in CHANNEL_MODES:
        raise UserError(f"model.channel_mode={channel_mode!r} is unknown: use one of {', '.join(CHANNEL_MODES)}")
    blocks = [int(c) for c in block_out_channels]
    bad = [c for c in blocks if c % norm_num_groups]
    if not blocks or bad:
        raise UserError(
            f"model.block_out_channels={blocks} must be non-empty and divisible by model.norm_num_groups="
            f"{norm_num_groups}: change one of them"
        )
    channels = 3 if channel_mode == "gray_to_rgb" else int(image_channels)
    common = dict(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=tuple(blocks),
        layers_per_block=int(layers_per_block),
        latent_channels=int(latent_channels),
        norm_num_groups=int(norm_num_groups),
        mid_block_add_attention=bool(mid_block_add_attention),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VQModel(num_vq_embeddings=int(num_vq_embeddings), **common) if kind == "vq" else AutoencoderKL(**common)
    return Autoencoder(model, image_channels=int(image_channels), channel_mode=channel_mode, data_range=data_range)


# ---------------------------------------------------------------------------------------------------------- loading
def load_state_into(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly; a UserError lists missing and unexpected keys and shape differences."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape differences", shapes)):
            if items:
                parts.append(f"{len(items)} {name}: {', '.join(items[:8])}{', ...' if len(items) > 8 else ''}")
        raise UserError(
            f"{source} does not fit the autoencoder architecture ({'; '.join(parts)}): use weights of the same "
            "architecture, or set the model's architecture (block_out_channels, layers_per_block, latent_channels, "
            "num_vq_embeddings, ...) to the checkpoint's"
        )
    model.load_state_dict(state)


def autoencoder_checkpoint_description(autoencoder: Autoencoder, ema: bool) -> dict[str, Any]:
    """The ``checkpoint["diffinv_pl"]`` entry of an AutoencoderTask checkpoint."""
    return {
        "format": CHECKPOINT_FORMAT, **autoencoder.describe(), "architecture": autoencoder.architecture(), "ema": ema
    }


def autoencoder_from_checkpoint(checkpoint: Mapping[str, Any], source: str) -> Autoencoder:
    """Rebuild the Autoencoder of an AutoencoderTask checkpoint dict (its EMA weights when it has an EMA)."""
    info = checkpoint.get("diffinv_pl") if isinstance(checkpoint, Mapping) else None
    if not isinstance(info, Mapping) or info.get("format") != CHECKPOINT_FORMAT:
        found = info.get("format") if isinstance(info, Mapping) else None
        raise UserError(
            f"{source} is not an autoencoder checkpoint of diffinv_pl (format {found!r}, expected "
            f"{CHECKPOINT_FORMAT!r}): pass a checkpoint written by train.py with an autoencoder experiment, or a "
            "diffusers autoencoder folder"
        )
    missing = [k for k in (*DESCRIPTION_KEYS, "architecture", "ema") if k not in info]
    if missing or info["kind"] not in KINDS:
        raise UserError(
            f"{source} has an incomplete autoencoder description (missing {missing}, kind {info.get('kind')!r}): "
            "it was not written by AutoencoderTask; retrain or pass a diffusers folder"
        )
    model = KINDS[info["kind"]].from_config(info["architecture"])
    ae = Autoencoder(model, info["image_channels"], info["channel_mode"], tuple(info["data_range"]))
    prefix = "ema.module.model." if info["ema"] else "autoencoder.model."
    state = {k[len(prefix):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(prefix)}
    load_state_into(ae.model, state, f"{source} ({prefix}* weights)")
    return ae


def _load_diffusers_folder(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    config_file = path / "config.json"
    fix = "give a folder written by save_pretrained (config.json + diffusion_pytorch_model.safetensors)"
    if not config_file.is_file():
        raise UserFileError(f"{path} has no config.json: {fix}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{config_file} is not readable JSON ({err}): {fix}") from err
    kind = CLASS_KINDS.get(config.get("_class_name"))
    if kind is None:
        raise UserError(
            f"{config_file} describes a {config.get('_class_name')!r}, not an autoencoder (VQModel or AutoencoderKL): "
            f"{fix}"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UserFileError(f"{path} has no weights ({' or '.join(WEIGHT_FILES)}): {fix}")
    model, info = KINDS[kind].from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False,
                                              output_loading_info=True)
    problems = [f"{name} {sorted(info[key])[:10]}" for key, name in
                (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "mismatched"))
                if info.get(key)]
    if problems:  # diffusers would leave missing weights at their random initialisation
        raise UserError(f"the weights in {path} do not fit its config.json ({'; '.join(problems)}): {fix}")
    sidecar = path / SIDECAR_NAME
    extra = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    return model, extra


def load_autoencoder(
    path: str | Path,
    *,
    image_channels: int | None = None,
    channel_mode: str | None = None,
    data_range: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
) -> Autoencoder:
    """Load an autoencoder (eval mode, no gradients) from a diffusers folder or an AutoencoderTask ``.ckpt``.

    Arguments left None take the stored values (the checkpoint's description, or the ``diffinv_autoencoder.json``
    written by :func:`~diffinv_pl.tasks.autoencoder_training.export_diffusers`), else the defaults of
    :class:`Autoencoder`. Missing or malformed files raise UserFileError / UserError naming the path and the fix.
    """
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise UserFileError(
            f"autoencoder {p} does not exist: give a diffusers autoencoder folder (save_pretrained) or an "
            "AutoencoderTask checkpoint (<run>/checkpoints/last.ckpt)"
        )
    if p.is_dir():
        model, stored = _load_diffusers_folder(p)
        ae = Autoencoder(
            model,
            image_channels=image_channels if image_channels is not None else stored.get("image_channels"),
            channel_mode=channel_mode or stored.get("channel_mode"),
            data_range=data_range or tuple(stored.get("data_range", UNIT)),
        )
    else:
        try:
            checkpoint = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to read means: not a checkpoint
            raise UserError(f"{p} is not a readable PyTorch checkpoint ({type(err).__name__}): pass an "
                            "AutoencoderTask .ckpt or a diffusers folder") from err
        stored_ae = autoencoder_from_checkpoint(checkpoint, str(p))
        ae = Autoencoder(
            stored_ae.model,
            image_channels=image_channels if image_channels is not None else stored_ae.image_channels,
            channel_mode=channel_mode or stored_ae.channel_mode,
            data_range=data_range or stored_ae.data_range,
        )
    ae.eval().requires_grad_(False)
    return ae.to(device)
