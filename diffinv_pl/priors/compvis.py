"""Official CompVis latent-diffusion checkpoints (LDM FFHQ ``model.ckpt`` + VQ-f4) as diffusers modules.

The CompVis ``model.ckpt`` is a PyTorch-Lightning-1.4 ``torch.save`` file: ``state_dict`` holds the U-Net
(``model.diffusion_model.*``, openaimodel ``UNetModel``), the first stage (``first_stage_model.*``, a taming
``VQModel``: Encoder, ``quantize.embedding``, ``quant_conv``, ``post_quant_conv``, Decoder), the schedule buffers,
``scale_factor`` (1.0 for VQ-f4) and, when trained with EMA, ``model_ema.*`` (LitEma: the U-Net's parameter names
``diffusion_model.a.b`` stored with the dots removed, ``model_ema.diffusion_modelab``). Besides tensors the file pickles
a few Lightning globals (the ``ModelCheckpoint`` callback class used as a dict key in ``callbacks``).

:func:`load_compvis_checkpoint` reads it with ``torch.load(weights_only=True)``; the Lightning globals in
:data:`ALLOWED_GLOBALS` are mapped to inert stub classes through ``torch.serialization.safe_globals`` (torch's own
restricted unpickler, which also resolves the zip file's storages), so no code from the file runs and every other
global is refused with a :class:`UserError` naming it.

Conversion (strict: any missing / unexpected key or shape mismatch is a :class:`UserError` listing them):

* :func:`convert_ldm_unet` -> diffusers ``UNet2DModel``. openaimodel's layout (input_blocks / middle_block /
  output_blocks) is renamed level by level. ``AttentionBlock`` uses the *legacy* QKV order (heads split before q/k/v):
  its ``qkv`` 1x1 conv weight (3C, C, 1) is read as (heads, 3, C/heads, C) and split into ``to_q`` / ``to_k`` /
  ``to_v`` linear weights; ``proj_out`` (C, C, 1) -> ``to_out.0``. The attention scale (q.k / sqrt(d) with
  d = ``num_head_channels``) and the timestep embedding ([cos, sin], max period 10^4, freq / half) agree with
  diffusers' ``flip_sin_to_cos=True, freq_shift=0``.
* :func:`convert_vq_f4` -> diffusers ``VQModel``: encoder / decoder / quant convs through diffusers'
  ``convert_ldm_vae_checkpoint`` (exact for the taming layout), plus the codebook ``quantize.embedding.weight``.

CLI (writes ``OUT_DIR/unet/``, ``OUT_DIR/vqvae/`` with ``save_pretrained`` and ``OUT_DIR/ldm.json``)::

    python -m diffinv_pl.priors.compvis convert model.ckpt OUT_DIR [--ema]

The LDM noise schedule is sqrt-linear: beta_t = (sqrt(0.0015) + (sqrt(0.0195) - sqrt(0.0015)) t / 999)^2,
t = 0..999; the U-Net predicts eps for z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, with z = scale_factor * latent.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from diffinv_pl.errors import UserError, UserFileError, report_user_errors
from diffinv_pl.utils.io import file_sha256

if TYPE_CHECKING:
    from diffusers import UNet2DModel, VQModel

UNET_PREFIX = "model.diffusion_model."
VQ_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
RECORD_FILE = "ldm.json"
RECORD_FORMAT = "diffinv_pl.compvis_ldm/1"


class LightningGlobalStub:
    """Inert stand-in for a Lightning class pickled in a checkpoint (e.g. the ``ModelCheckpoint`` class used as a key
    of ``callbacks``); instances only store their pickled state."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


# (module, name) pairs a Lightning-1.4 LDM checkpoint may pickle besides tensors, each read as an inert stub
ALLOWED_GLOBALS: tuple[tuple[str, str], ...] = (
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("pytorch_lightning.callbacks.early_stopping", "EarlyStopping"),
    ("pytorch_lightning.callbacks.lr_monitor", "LearningRateMonitor"),
    ("pytorch_lightning.utilities.parsing", "AttributeDict"),
)
_STUBS = {key: type(key[1], (LightningGlobalStub,), {"__module__": key[0]}) for key in ALLOWED_GLOBALS}


def _numpy_scalar() -> Any:
    try:
        return np._core.multiarray.scalar  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        return np.core.multiarray.scalar


def _safe_globals() -> list:
    """torch's weights-only allow-list additions: the Lightning stubs under their original names, numpy scalars."""
    entries: list = [(stub, f"{module}.{name}") for (module, name), stub in _STUBS.items()]
    entries += [(_numpy_scalar(), "numpy.core.multiarray.scalar"), (_numpy_scalar(), "numpy._core.multiarray.scalar"),
                np.dtype]
    return entries


def refused_global(err: Exception) -> str | None:
    """The ``module.name`` torch's weights-only unpickler refused (its message says ``GLOBAL module.name``)."""
    match = re.search(r"GLOBAL\s+([A-Za-z_][\w.]*)", str(err))
    return match.group(1) if match else None


def load_compvis_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The ``state_dict`` of a CompVis LDM ``model.ckpt`` (or a plain dict of tensors saved by ``torch.save``), read
    with ``torch.load(weights_only=True)`` and the inert stubs of :data:`ALLOWED_GLOBALS`. ``scale_factor`` is kept
    as a tensor entry when present. Missing file: :class:`UserFileError`; any other pickled global, or a corrupt
    file: :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserFileError(
            f"no CompVis checkpoint at {str(path)!r}: download the official LDM FFHQ model.ckpt "
            "(CompVis/latent-diffusion README, ffhq-ldm-vq-4) and pass its path"
        )
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = refused_global(err)
        if name is None:
            raise UserError(f"{str(path)!r} is not a readable torch checkpoint ({str(err)[:200]}); download model.ckpt "
                            "again") from err
        raise UserError(
            f"refused to load {str(path)!r}: it pickles the global {name} which is not on the allow-list "
            f"({', '.join('.'.join(k) for k in ALLOWED_GLOBALS)}); running pickled code is unsafe. Use the official "
            "CompVis model.ckpt, or re-save a trusted file as a plain dict of tensors"
        ) from err
    except Exception as err:  # noqa: BLE001 (truncated / not a torch checkpoint)
        raise UserError(f"{str(path)!r} is not a readable torch checkpoint ({type(err).__name__}: {str(err)[:200]}); "
                        "download model.ckpt again") from err
    state = data.get("state_dict", data) if isinstance(data, Mapping) else None
    if not isinstance(state, Mapping):
        raise UserError(f"{str(path)!r} holds a {type(data).__name__}, not a checkpoint dict with a 'state_dict'")
    bad = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if bad:
        raise UserError(f"{str(path)!r}: state_dict entries {bad[:10]} are not tensors: the file is not an LDM "
                        "checkpoint")
    return dict(state)


@dataclass
class LDMUNetConfig:
    """openaimodel ``UNetModel`` hyperparameters (defaults: LDM FFHQ 256, ffhq-ldm-vq-4.yaml)."""

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 224
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8, 4, 2)
    num_head_channels: int = 32


@dataclass
class VQConfig:
    """taming ``VQModel`` hyperparameters (defaults: VQ-f4, models/first_stage_models/vq-f4/config.yaml)."""

    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 3
    embed_dim: int = 3
    n_embed: int = 8192


@dataclass
class LDMConfig:
    """The whole LDM: U-Net, first stage and the sqrt-linear schedule."""

    unet: LDMUNetConfig = field(default_factory=LDMUNetConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    linear_start: float = 0.0015
    linear_end: float = 0.0195
    num_timesteps: int = 1000


def load_strict(model: torch.nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Load ``state`` into ``model`` after checking names and shapes; a UserError lists every difference."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise UserError(
            f"the {what} weights do not match the architecture: missing {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected {unexpected[:20]}, shape mismatches {shapes[:20]}; "
            "check the config (architecture hyperparameters) or use an unmodified official checkpoint"
        )
    model.load_state_dict(dict(state), strict=True)


def unet_diffusers_config(config: LDMUNetConfig) -> dict:
    """``UNet2DModel`` kwargs for an openaimodel U-Net (no scale-shift norm, conv resampling, 32 GroupNorm groups)."""
    ds, down, up = 1, [], []
    for _ in config.channel_mult:
        down.append("AttnDownBlock2D" if ds in config.attention_resolutions else "DownBlock2D")
        up.insert(0, "AttnUpBlock2D" if ds in config.attention_resolutions else "UpBlock2D")
        ds *= 2
    return dict(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=tuple(down), up_block_types=tuple(up),
        block_out_channels=tuple(config.model_channels * m for m in config.channel_mult),
        layers_per_block=config.num_res_blocks, attention_head_dim=config.num_head_channels, norm_num_groups=32,
        norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, time_embedding_type="positional",
        resnet_time_scale_shift="default", add_attention=True, downsample_padding=1,
    )


def convert_resnet_block(src: str, dst: str, state: Mapping[str, Tensor], out: dict, used: set) -> None:
    """openaimodel ResBlock -> diffusers ResnetBlock2D."""
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
             "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    for old, new in names.items():
        for p in ("weight", "bias"):
            key = f"{src}.{old}.{p}"
            if key in state:
                out[f"{dst}.{new}.{p}"] = state[key]
                used.add(key)


def convert_legacy_attention(src: str, dst: str, state: Mapping[str, Tensor], out: dict, used: set, head_channels: int) -> None:
    """openaimodel AttentionBlock (legacy order: per head [q, k, v]) -> diffusers Attention. An incomplete block is
    left unconverted (the strict load then reports it)."""
    names = [f"{src}.{n}.{p}" for n in ("norm", "qkv", "proj_out") for p in ("weight", "bias")]
    if not all(name in state for name in names):
        return
    channels = state[f"{src}.qkv.weight"].shape[1]
    if state[f"{src}.qkv.weight"].shape != (3 * channels, channels, 1) or channels % head_channels:
        return  # not this architecture's attention: the strict load reports the keys
    for p in ("weight", "bias"):
        out[f"{dst}.group_norm.{p}"] = state[f"{src}.norm.{p}"]
    w, b = state[f"{src}.qkv.weight"], state[f"{src}.qkv.bias"]
    heads = channels // head_channels
    w = w.reshape(heads, 3, head_channels, channels)
    b = b.reshape(heads, 3, head_channels)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{dst}.{name}.weight"] = w[:, i].reshape(channels, channels).contiguous()
        out[f"{dst}.{name}.bias"] = b[:, i].reshape(channels).contiguous()
    out[f"{dst}.to_out.0.weight"] = state[f"{src}.proj_out.weight"][..., 0].contiguous()
    out[f"{dst}.to_out.0.bias"] = state[f"{src}.proj_out.bias"]
    used.update(names)


def convert_stem_and_head(state: Mapping[str, Tensor], out: dict, used: set) -> None:
    """The layers an openaimodel / guided-diffusion U-Net shares with ``UNet2DModel`` one to one: the time-embedding
    MLP, the input convolution and the output norm and convolution (absent keys stay absent)."""
    copy = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    for old, new in copy.items():
        for p in ("weight", "bias"):
            if f"{old}.{p}" in state:
                out[f"{new}.{p}"] = state[f"{old}.{p}"]
                used.add(f"{old}.{p}")


def unet_state_to_diffusers(state: Mapping[str, Tensor], config: LDMUNetConfig) -> dict[str, Tensor]:
    """Rename an openaimodel U-Net state dict (no ``model.diffusion_model.`` prefix) to ``UNet2DModel``'s names.
    Keys that are absent stay absent, so the strict load reports them."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    convert_stem_and_head(state, out, used)

    def attn(src: str, dst: str) -> None:
        convert_legacy_attention(src, dst, state, out, used, config.num_head_channels)

    block, ds, levels = 1, 1, len(config.channel_mult)
    for level in range(levels):
        for j in range(config.num_res_blocks):
            convert_resnet_block(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", state, out, used)
            if ds in config.attention_resolutions:
                attn(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}")
            block += 1
        if level != levels - 1:
            for p in ("weight", "bias"):
                key = f"input_blocks.{block}.0.op.{p}"
                if key in state:
                    out[f"down_blocks.{level}.downsamplers.0.conv.{p}"] = state[key]
                    used.add(key)
            block, ds = block + 1, ds * 2
    convert_resnet_block("middle_block.0", "mid_block.resnets.0", state, out, used)
    attn("middle_block.1", "mid_block.attentions.0")
    convert_resnet_block("middle_block.2", "mid_block.resnets.1", state, out, used)
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(config.num_res_blocks + 1):
            convert_resnet_block(f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}", state, out, used)
            has_attn = ds in config.attention_resolutions
            if has_attn:
                attn(f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{j}")
            if level != 0 and j == config.num_res_blocks:
                for p in ("weight", "bias"):
                    key = f"output_blocks.{block}.{2 if has_attn else 1}.conv.{p}"
                    if key in state:
                        out[f"up_blocks.{up}.upsamplers.0.conv.{p}"] = state[key]
                        used.add(key)
            block += 1
        ds //= 2
    for key in sorted(set(state) - used):  # not part of the architecture: reported as unexpected by the strict load
        out[f"<unconverted> {key}"] = state[key]
    return out


def convert_ldm_unet(state_dict: Mapping[str, Tensor], config: LDMUNetConfig | None = None) -> UNet2DModel:
    """A diffusers ``UNet2DModel`` with the weights of an openaimodel U-Net. ``state_dict``: the U-Net's keys with or
    without the ``model.diffusion_model.`` prefix (other keys are ignored). Strict: UserError on any difference."""
    from diffusers import UNet2DModel

    config = config or LDMUNetConfig()
    state = {k[len(UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)} or dict(state_dict)
    model = UNet2DModel(**unet_diffusers_config(config))
    load_strict(model, unet_state_to_diffusers(state, config), "LDM U-Net (model.diffusion_model.*)")
    return model.eval()


def vq_diffusers_config(config: VQConfig) -> dict:
    """``VQModel`` kwargs for a taming VQModel without attention outside the mid blocks (VQ-f4)."""
    n = len(config.ch_mult)
    return dict(
        in_channels=config.in_channels, out_channels=config.out_ch, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        layers_per_block=config.num_res_blocks, act_fn="silu", latent_channels=config.z_channels,
        sample_size=config.resolution, num_vq_embeddings=config.n_embed, norm_num_groups=32,
        vq_embed_dim=config.embed_dim, scaling_factor=1.0,
    )


_VQ_ATTN_WEIGHT = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def vq_state_to_diffusers(state_dict: Mapping[str, Tensor], config: VQConfig) -> dict[str, Tensor]:
    """Rename a taming VQModel state dict (with or without ``first_stage_model.``; ``loss.*`` dropped) to
    ``VQModel``'s names: diffusers' ``convert_ldm_vae_checkpoint`` (exact for this layout, incl. the mid-block 1x1-conv
    attention -> linear) plus the codebook. Keys it does not use are kept under ``<unconverted> name``."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = {k[len(VQ_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VQ_PREFIX)} or dict(state_dict)
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    converted = convert_ldm_vae_checkpoint(dict(state), vq_diffusers_config(config))
    if "quantize.embedding.weight" in state:
        converted["quantize.embedding.weight"] = state["quantize.embedding.weight"]
    used = {id(v) for v in converted.values()}  # copied tensors; the 1x1-conv attention weights are reshaped views
    for key, value in state.items():
        if id(value) not in used and not _VQ_ATTN_WEIGHT.fullmatch(key):
            converted[f"<unconverted> {key}"] = value
    return converted


def convert_vq_f4(state_dict: Mapping[str, Tensor], config: VQConfig | None = None) -> VQModel:
    """A diffusers ``VQModel`` with the weights of a taming VQModel (:func:`vq_state_to_diffusers`). Strict: UserError
    on any missing / unexpected key or shape mismatch."""
    from diffusers import VQModel

    config = config or VQConfig()
    model = VQModel(**vq_diffusers_config(config))
    load_strict(model, vq_state_to_diffusers(state_dict, config), "VQ first stage (first_stage_model.*)")
    return model.eval()


def ema_unet_state(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The EMA U-Net weights as ``model.diffusion_model.*`` keys: LitEma stores ``diffusion_model.a.b`` as
    ``model_ema.diffusion_modelab``. Every non-EMA U-Net key must have its EMA copy (UserError listing the missing)."""
    out, missing = {}, []
    for key in state_dict:
        if key.startswith(UNET_PREFIX):
            ema_key = EMA_PREFIX + key[len("model."):].replace(".", "")
            if ema_key in state_dict:
                out[key] = state_dict[ema_key]
            else:
                missing.append(ema_key)
    if missing or not out:
        raise UserError(f"--ema: the checkpoint has no EMA weights for {len(missing) or 'any'} U-Net parameter(s) "
                        f"{missing[:10]}; convert without --ema (DAPS / ReSample run the non-EMA weights)")
    return out


def sqrt_linear_betas(config: LDMConfig) -> Tensor:
    """beta_t = (sqrt(linear_start) + (sqrt(linear_end) - sqrt(linear_start)) t / (T - 1))^2, t = 0..T-1 (float64,
    as ldm ``make_beta_schedule("linear")``)."""
    return torch.linspace(config.linear_start ** 0.5, config.linear_end ** 0.5, config.num_timesteps,
                          dtype=torch.float64) ** 2


def check_schedule(state: Mapping[str, Tensor], config: LDMConfig) -> None:
    """The checkpoint's ``betas`` buffer (when present) must be the configured sqrt-linear schedule."""
    betas = state.get("betas")
    if betas is None:
        return
    want = sqrt_linear_betas(config)
    if betas.shape != want.shape or not torch.allclose(betas.double(), want, rtol=1e-5, atol=1e-9):
        raise UserError(
            f"the checkpoint's betas ({tuple(betas.shape)}, first {float(betas[0]):.6g}, last {float(betas[-1]):.6g}) "
            f"are not the sqrt-linear schedule {config.linear_start} -> {config.linear_end} over "
            f"{config.num_timesteps} steps: set linear_start / linear_end / num_timesteps to the model's values"
        )


def convert_ldm_checkpoint(path: str | Path, out_dir: str | Path, config: LDMConfig | None = None,
                           ema: bool = False) -> Path:
    """Convert a CompVis LDM ``model.ckpt``: ``OUT_DIR/unet/`` and ``OUT_DIR/vqvae/`` (``save_pretrained``) and
    ``OUT_DIR/ldm.json`` (schedule, scale_factor, shapes, source file + sha256). Both networks load strictly before
    anything is written."""
    path, out_dir = Path(path), Path(out_dir)
    config = config or LDMConfig()
    state = load_compvis_checkpoint(path)
    check_schedule(state, config)
    unet_state = ema_unet_state(state) if ema else state
    unet = convert_ldm_unet({k: v for k, v in unet_state.items() if k.startswith(UNET_PREFIX)}, config.unet)
    vq = convert_vq_f4({k: v for k, v in state.items() if k.startswith(VQ_PREFIX)}, config.vq)
    scale = state.get("scale_factor")
    downsample = 2 ** (len(config.vq.ch_mult) - 1)
    record = {
        "format": RECORD_FORMAT, "beta_schedule": "sqrt_linear", "linear_start": config.linear_start,
        "linear_end": config.linear_end, "num_timesteps": config.num_timesteps,
        "scale_factor": float(scale) if scale is not None else 1.0, "latent_channels": config.vq.embed_dim,
        "image_size": config.unet.image_size * downsample, "latent_size": config.unet.image_size,
        "downsample_factor": downsample, "ema": bool(ema), "prediction": "eps",
        "source": {"file": path.name, "sha256": file_sha256(path)},
        "config": {"unet": asdict(config.unet), "vq": asdict(config.vq)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir / "unet")
    vq.save_pretrained(out_dir / "vqvae")
    (out_dir / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return out_dir


def load_converted_ldm(out_dir: str | Path,
                       device: str | torch.device = "cpu") -> tuple[UNet2DModel, VQModel, dict]:
    """(UNet2DModel, VQModel, record) from a folder written by :func:`convert_ldm_checkpoint`, eval mode, frozen."""
    out_dir = Path(out_dir)
    fix = ("convert the official checkpoint first: `python -m diffinv_pl.priors.compvis convert model.ckpt OUT_DIR` "
           "and pass OUT_DIR")
    if not out_dir.is_dir():
        raise UserFileError(f"no converted LDM folder at {str(out_dir)!r}: {fix}")
    for needed in (out_dir / RECORD_FILE, out_dir / "unet" / "config.json", out_dir / "vqvae" / "config.json"):
        if not needed.is_file():
            raise UserFileError(f"{str(needed)!r} is missing from the converted LDM folder: {fix}")
    try:
        record = json.loads((out_dir / RECORD_FILE).read_text())
    except ValueError as err:
        raise UserError(f"{str(out_dir / RECORD_FILE)!r} is not valid JSON ({err}): {fix}") from err
    if record.get("format") != RECORD_FORMAT:
        raise UserError(f"{str(out_dir / RECORD_FILE)!r} has format {record.get('format')!r}, not {RECORD_FORMAT!r}: "
                        f"{fix}")
    from diffinv_pl.priors.autoencoders import load_autoencoder
    from diffinv_pl.priors.diffusers_folder import load_unet

    unet = load_unet(out_dir / "unet", device)  # strict and offline: never random weights
    vq = load_autoencoder(out_dir / "vqvae", device=device).model.eval().requires_grad_(False)
    return unet, vq, record


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffinv_pl.priors.compvis", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a CompVis LDM model.ckpt to diffusers unet/ + vqvae/ + ldm.json")
    conv.add_argument("checkpoint", type=Path)
    conv.add_argument("out_dir", type=Path)
    conv.add_argument("--ema", action="store_true", help="use the model_ema.* U-Net weights (default: non-EMA)")
    conv.add_argument("--config", type=Path, default=None,
                      help="JSON {'unet': {...}, 'vq': {...}} overriding the FFHQ LDM VQ-f4 hyperparameters")
    args = parser.parse_args(argv)
    config = LDMConfig()
    if args.config is not None:
        if not args.config.is_file():
            raise UserFileError(f"no config file at {str(args.config)!r}: pass a JSON file with 'unet' / 'vq' entries")
        overrides = json.loads(args.config.read_text())
        try:
            config = LDMConfig(unet=LDMUNetConfig(**_tuples(overrides.get("unet", {}))),
                               vq=VQConfig(**_tuples(overrides.get("vq", {}))),
                               **{k: v for k, v in overrides.items() if k not in ("unet", "vq")})
        except TypeError as err:
            raise UserError(f"{str(args.config)!r}: {err}; valid fields: unet {list(asdict(LDMUNetConfig()))}, vq "
                            f"{list(asdict(VQConfig()))}, linear_start, linear_end, num_timesteps") from err
    out = convert_ldm_checkpoint(args.checkpoint, args.out_dir, config, args.ema)
    print(f"wrote {out / 'unet'}, {out / 'vqvae'} and {out / RECORD_FILE}")


def _tuples(values: Mapping[str, Any]) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


if __name__ == "__main__":
    main()
