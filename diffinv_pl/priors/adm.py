"""Public guided-diffusion (ADM) pixel checkpoints as diffusers ``UNet2DModel`` priors.

The files (``docs/checkpoints_adm.md``): ``ffhq_10m.pt`` (DPS / CoDPS / DAPS FFHQ-256) and openai's
``256x256_diffusion_uncond.pt`` (ImageNet-256, unconditional) are plain ``torch.save`` state dicts of
``guided_diffusion.unet.UNetModel`` with the recipe: 2-D, unconditional, scale-shift norm (``use_scale_shift_norm``),
residual-block resampling (``resblock_updown``, avg-pool down / nearest up, no convs), legacy QKV order
(``QKVAttentionLegacy``), ``learn_sigma`` (2 * 3 output channels: eps, then the variance interpolation logits).

:func:`load_adm_state_dict` reads the file with ``torch.load(weights_only=True)`` (torch's restricted unpickler: no
code from the file runs) and accepts only a flat mapping of names to tensors.

:func:`convert_adm_unet` builds the equivalent ``UNet2DModel`` (``AttnDownBlock2D`` at the attention levels and
``ResnetDownsampleBlock2D`` elsewhere, ``downsample_type = upsample_type = "resnet"``,
``resnet_time_scale_shift="scale_shift"``, ``attention_head_dim`` = ``num_head_channels``,
``attn_norm_num_groups=32`` for the mid-block attention, positional time embedding [cos, sin] with
``flip_sin_to_cos=True, freq_shift=0``) and loads the renamed weights strictly (any missing / unexpected key or shape
mismatch is a :class:`UserError` listing them; never random weights). The fused attention ``qkv`` 1x1 conv weight
(3C, C, 1) is laid out per head as [q_h, k_h, v_h] blocks of C/heads rows (the legacy order), so it is read as
(heads, 3, C/heads, C) and split per head; ``chunk(3)`` on it would mix heads' q, k and v. The attention scale
(q/d^(1/4)) . (k/d^(1/4)) equals diffusers' q.k / sqrt(d), d = ``num_head_channels``.

:func:`adm_prior` puts the converted network behind an eps-to-denoiser wrapper as a :class:`NetworkPrior` on
[-1, 1] images (``conf/prior/adm_ffhq.yaml``, ``conf/prior/adm_imagenet.yaml``). The network was trained on the DDPM
``linear`` schedule beta_t = 1e-4 ... 0.02, 1000 steps: sigma_t = sqrt((1 - abar_t) / abar_t) runs from 0.01
(t = 0) to 157.4 (t = 999), the prior's ``sigma_range``. ``time_map``: ``vp`` (released DAPS, ``VPPrecond``: network
time 999 * t(sigma) of the continuous VP schedule beta_min 0.1, beta_d 19.9) or ``ddpm`` (the training index of the
discrete schedule at sigma, interpolated in log sigma).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from diffinv_pl.diffusion.preconditioning import DiscreteVPEpsPrecond, VPEpsPrecond, discrete_vp_sigmas
from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.priors.compvis import (convert_legacy_attention, convert_resnet_block, convert_stem_and_head,
                                       load_strict, refused_global)
from diffinv_pl.priors.latent import DiffusersEpsNet
from diffinv_pl.priors.network import NetworkPrior, RangeAdaptedPrior

if TYPE_CHECKING:
    from diffusers import UNet2DModel

MODEL_RANGE = (-1.0, 1.0)
TIME_MAPS = ("vp", "ddpm")
DPS_README = "https://github.com/DPS2022/diffusion-posterior-sampling"
IMAGENET_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"
# the DDPM "linear" schedule both networks were trained with
LINEAR_START, LINEAR_END, NUM_TRAIN_STEPS = 1e-4, 0.02, 1000


@dataclass(frozen=True)
class ADMConfig:
    """guided-diffusion ``UNetModel`` hyperparameters (defaults: DPS ``ffhq_10m.pt``, 93.56 M parameters).

    ``attention_resolutions`` are pixel resolutions as in guided-diffusion's ``script_util`` flags (16 at 256 px is
    downsampling rate 16); ``learn_sigma`` doubles the output channels. The recipe (scale-shift norm, resblock
    up/down, legacy QKV order, unconditional) is fixed: it is what the public files use.
    """

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 128
    num_res_blocks: int = 1
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    attention_resolutions: tuple[int, ...] = (16,)
    num_head_channels: int = 64
    learn_sigma: bool = True

    @classmethod
    def ffhq(cls) -> ADMConfig:
        """DPS / DAPS ``ffhq_10m.pt``: 128 ch, 1 res block, attention at 16 px."""
        return cls()

    @classmethod
    def imagenet(cls) -> ADMConfig:
        """openai ``256x256_diffusion_uncond.pt``: 256 ch, 2 res blocks, attention at 32 / 16 / 8 px (552.8 M)."""
        return cls(model_channels=256, num_res_blocks=2, attention_resolutions=(32, 16, 8))

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def attention_ds(self) -> tuple[int, ...]:
        """The downsampling rates with attention: image_size // resolution (``script_util.create_model``)."""
        return tuple(self.image_size // int(r) for r in self.attention_resolutions)


NAMED_CONFIGS = {"ffhq": ADMConfig.ffhq, "imagenet": ADMConfig.imagenet}
SOURCES = {"ffhq": f"ffhq_10m.pt (DPS README {DPS_README}, section 'Download pretrained checkpoint')",
           "imagenet": IMAGENET_URL}


def resolve_config(config: str | Path | Mapping[str, Any] | ADMConfig) -> ADMConfig:
    """An :class:`ADMConfig` from a name in :data:`NAMED_CONFIGS`, a JSON file of fields, or a mapping of fields
    (lists, also OmegaConf's, become tuples). UserError names the valid choices."""
    if isinstance(config, ADMConfig):
        return config
    if isinstance(config, str) and config in NAMED_CONFIGS:
        return NAMED_CONFIGS[config]()
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise UserFileError(
                f"prior.config={str(config)!r} is neither a named ADM config ({', '.join(NAMED_CONFIGS)}) nor a JSON "
                f"file: use one of those names or a JSON file with fields of {[f.name for f in fields(ADMConfig)]}"
            )
        try:
            config = json.loads(path.read_text())
        except ValueError as err:
            raise UserError(f"{str(path)!r} is not valid JSON ({err}): write the ADMConfig fields as a JSON "
                            "object") from err
    if not isinstance(config, Mapping):
        raise UserError(f"prior.config must be a name, a JSON file or a mapping, got {type(config).__name__}")
    values = {k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in config.items()}
    try:
        return ADMConfig(**values)
    except TypeError as err:
        raise UserError(f"prior.config: {err}; valid fields: {[f.name for f in fields(ADMConfig)]}") from err


def load_adm_state_dict(path: str | Path, source: str = SOURCES["ffhq"]) -> dict[str, Tensor]:
    """The state dict of a guided-diffusion checkpoint, read with ``torch.load(weights_only=True)``.

    Missing file: :class:`UserFileError` naming the path, ``source`` (where to download it) and where to put it.
    A pickled global outside torch's weights-only allow-list (e.g. code that would run on unpickling), a corrupt
    file, or anything but a flat mapping of names to tensors: :class:`UserError`."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise UserFileError(
            f"no guided-diffusion checkpoint at {str(path)!r}: download {source} and put it at "
            f"${{paths.data_dir}}/weights/{path.name} (or pass prior.path=<file>); docs/checkpoints_adm.md lists the "
            "files"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = refused_global(err)
        if name is None:
            raise UserError(f"{str(path)!r} is not a readable torch checkpoint ({str(err).splitlines()[0][:200]}); "
                            f"download it again ({source})") from err
        raise UserError(
            f"refused to load {str(path)!r}: it pickles the global {name}, which torch's weights-only unpickler does "
            "not allow (running pickled code is unsafe); a released guided-diffusion file is a plain state_dict of "
            "tensors: download it again, or re-save a trusted file with torch.save(model.state_dict())"
        ) from err
    except Exception as err:  # noqa: BLE001 (truncated / not a torch file)
        raise UserError(f"{str(path)!r} is not a readable torch checkpoint ({type(err).__name__}: {str(err)[:200]}); "
                        f"download it again ({source})") from err
    if not isinstance(data, Mapping):
        raise UserError(f"{str(path)!r} holds a {type(data).__name__}, not a state_dict: a guided-diffusion "
                        "checkpoint is a plain dict of parameter names to tensors")
    bad = sorted(str(k) for k, v in data.items() if not (isinstance(k, str) and isinstance(v, Tensor)))
    if bad:
        raise UserError(f"{str(path)!r} is not a plain state_dict: entries {bad[:10]} are not tensors (a training "
                        "checkpoint or wrapper?); save the model's state_dict() alone")
    return dict(data)


def unet_diffusers_config(config: ADMConfig) -> dict:
    """``UNet2DModel`` keyword arguments of the guided-diffusion U-Net ``config`` (module docstring)."""
    ds, down, up = 1, [], []
    for _ in config.channel_mult:
        attn = ds in config.attention_ds
        down.append("AttnDownBlock2D" if attn else "ResnetDownsampleBlock2D")
        up.insert(0, "AttnUpBlock2D" if attn else "ResnetUpsampleBlock2D")
        ds *= 2
    return dict(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=tuple(down), up_block_types=tuple(up),
        block_out_channels=tuple(config.model_channels * m for m in config.channel_mult),
        layers_per_block=config.num_res_blocks, attention_head_dim=config.num_head_channels, norm_num_groups=32,
        attn_norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        time_embedding_type="positional", resnet_time_scale_shift="scale_shift", downsample_type="resnet",
        upsample_type="resnet", add_attention=True,
    )


def adm_state_to_diffusers(state: Mapping[str, Tensor], config: ADMConfig) -> dict[str, Tensor]:
    """Rename a guided-diffusion state dict to ``UNet2DModel``'s names (attention qkv split per head). Absent keys
    stay absent and unused ones are kept as ``<unconverted> name``, so the strict load reports both."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    convert_stem_and_head(state, out, used)

    def resnet(src: str, dst: str) -> None:
        convert_resnet_block(src, dst, state, out, used)

    def attn(src: str, dst: str) -> None:
        convert_legacy_attention(src, dst, state, out, used, config.num_head_channels)

    block, ds, levels = 1, 1, len(config.channel_mult)
    for level in range(levels):
        for j in range(config.num_res_blocks):
            resnet(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}")
            if ds in config.attention_ds:
                attn(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}")
            block += 1
        if level != levels - 1:
            resnet(f"input_blocks.{block}.0", f"down_blocks.{level}.downsamplers.0")
            block, ds = block + 1, ds * 2
    resnet("middle_block.0", "mid_block.resnets.0")
    attn("middle_block.1", "mid_block.attentions.0")
    resnet("middle_block.2", "mid_block.resnets.1")
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(config.num_res_blocks + 1):
            resnet(f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}")
            has_attn = ds in config.attention_ds
            if has_attn:
                attn(f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{j}")
            if level != 0 and j == config.num_res_blocks:
                resnet(f"output_blocks.{block}.{2 if has_attn else 1}", f"up_blocks.{up}.upsamplers.0")
            block += 1
        ds //= 2
    for key in sorted(set(state) - used):
        out[f"<unconverted> {key}"] = state[key]
    return out


def convert_adm_unet(state_dict: Mapping[str, Tensor], config: ADMConfig | None = None) -> UNet2DModel:
    """A diffusers ``UNet2DModel`` (eval mode) with the weights of a guided-diffusion ``UNetModel``; ``unet(x, t)``
    equals the original ``model(x, t)`` (all 2 * C channels for learn_sigma). Strict: UserError on any missing /
    unexpected key or shape mismatch."""
    from diffusers import UNet2DModel

    config = config or ADMConfig()
    model = UNet2DModel(**unet_diffusers_config(config))
    load_strict(model, adm_state_to_diffusers(state_dict, config), "guided-diffusion U-Net")
    return model.eval()


def adm_prior(
    path: str | Path,
    config: str | Path | Mapping[str, Any] = "ffhq",
    data_range: tuple[float, float] | None = MODEL_RANGE,
    time_map: str = "vp",
    per_sample_calls: bool = False,
    map_location: str = "cpu",
) -> NetworkPrior | RangeAdaptedPrior:
    """The guided-diffusion checkpoint at ``path`` as a whole-image prior.

    Args:
        path: the ``.pt`` state dict (``ffhq_10m.pt``, ``256x256_diffusion_uncond.pt``).
        config: ``ffhq`` | ``imagenet`` | a JSON file or mapping of :class:`ADMConfig` fields.
        data_range: the solver's image range; the network's is [-1, 1] (another range wraps it in a
            :class:`RangeAdaptedPrior`; null keeps [-1, 1]).
        time_map: ``vp`` (DAPS) or ``ddpm`` (module docstring).
        per_sample_calls: one network call per image (:class:`NetworkPrior`).
        map_location: device of the network.
    """
    if time_map not in TIME_MAPS:
        raise UserError(f"prior.time_map={time_map!r} is unknown: use one of {', '.join(TIME_MAPS)}")
    named = str(config) if isinstance(config, str) and config in NAMED_CONFIGS else None
    adm_config = resolve_config(config)
    state = load_adm_state_dict(path, SOURCES[named] if named else "the checkpoint that matches prior.config")
    unet = convert_adm_unet(state, adm_config).to(map_location).requires_grad_(False)
    net = DiffusersEpsNet(unet)
    if time_map == "vp":
        denoiser = VPEpsPrecond(net, NUM_TRAIN_STEPS, learned_variance=adm_config.learn_sigma)
    else:
        denoiser = DiscreteVPEpsPrecond(net, "linear", NUM_TRAIN_STEPS, LINEAR_START, LINEAR_END,
                                        learned_variance=adm_config.learn_sigma)
    sigmas = discrete_vp_sigmas("linear", NUM_TRAIN_STEPS, LINEAR_START, LINEAR_END)
    prior = NetworkPrior(denoiser.eval(), MODEL_RANGE, adm_config.in_channels,
                         (float(sigmas[0]), float(sigmas[-1])), per_sample_calls)
    if data_range is None or tuple(float(v) for v in data_range) == MODEL_RANGE:
        return prior
    return RangeAdaptedPrior(prior, tuple(float(v) for v in data_range), MODEL_RANGE)
