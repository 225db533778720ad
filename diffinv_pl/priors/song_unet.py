"""EDM's ``SongUNet`` (the DDPM++ / NCSN++ U-Net of Karras et al. 2022, PaDIS's network) with EDM's parameter names.

A re-implementation from the architecture description of NVlabs/edm ``training/networks.py``, so that the state dict
of an official EDM or PaDIS network (``model.*`` inside its preconditioning wrapper) loads with ``strict=True``.

Architecture (C = model_channels, L = len(channel_mult) levels, R = img_resolution, E = channel_mult_emb * C):

* noise embedding: sinusoidal ("positional", DDPM++) emb_k = [sin(c w_k), cos(c w_k)] with
  w_k = (1/10000)^(k / (C/2 - 1)), k = 0 .. C/2 - 1 (EDM computes [cos, sin] and swaps the halves), or random
  Fourier features ("fourier", NCSN++) with frequencies 2 pi f_k; then two Linear + SiLU layers to E channels;
* encoder, level l at resolution r = R >> l: ``{r}x{r}_conv`` (level 0, 3x3) or ``{r}x{r}_down`` (a down-sampling
  block), then ``num_blocks`` blocks ``{r}x{r}_block{i}`` to C * channel_mult[l] channels, with self-attention where
  r is in ``attn_resolutions``; every output is kept as a skip;
* decoder from the coarsest level: ``{r}x{r}_in0`` (always with attention) and ``{r}x{r}_in1`` at the coarsest level,
  ``{r}x{r}_up`` elsewhere, then ``num_blocks + 1`` blocks on [x, skip] concatenations (attention in the last one
  where r is in ``attn_resolutions``); the output ``{r}x{r}_aux_norm`` -> SiLU -> ``{r}x{r}_aux_conv`` at level 0;
* every block: x' = (conv1(dropout(SiLU(GN(conv0(SiLU(GN(x))) + affine(emb))))) + skip(x)) / sqrt(2), with skip a
  1x1 convolution (with the block's resampling) when the channels change or the block resamples, identity otherwise;
  attention blocks then add proj(softmax(q^T k / sqrt(c)) v) with q, k, v from one fused 1x1 ``qkv`` convolution
  (one head) and divide by sqrt(2) again;
* resampling: the FIR filter f f^T / (sum f)^2 (``resample_filter``, [1, 1] = 2x2 box) applied depthwise with
  stride 2 (down) or as a stride-2 transposed convolution with gain 4 (up), stored as a ``resample_filter`` buffer.

The level names embed R, so a checkpoint's keys reveal the canvas side it was built for (PaDIS: R = 256 + 2 pad).
The network itself runs on any input whose side is divisible by 2^(L-1) (patches smaller than R included).

Calling convention of the project's backbones (``net(x_in, c_noise, pos=None)``): ``pos`` (B, 2, H, W) positional
channels are concatenated to the (c_in-scaled) image, so ``in_channels`` counts them (PaDIS: 1 image + 2 positions).
:class:`SongUNetPrecond` is EDM's preconditioning wrapper holding the network as ``model`` (EDM's parameter names).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffinv_pl.diffusion.preconditioning import edm_coefficients
from diffinv_pl.errors import UserError

SKIP_SCALE = math.sqrt(0.5)
EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def _xavier_uniform_(weight: Tensor, fan_in: int, fan_out: int, gain: float = 1.0) -> Tensor:
    """In-place U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out)) (EDM's 'xavier_uniform' times init_weight)."""
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def fir_filter_2d(taps: Sequence[float]) -> Tensor:
    """The separable resampling filter f f^T / (sum f)^2 of shape (1, 1, n, n) (unit DC gain)."""
    taps = [float(t) for t in taps]
    if not taps or sum(taps) == 0.0:
        raise UserError(f"resample_filter must be a non-empty list of taps with a nonzero sum, got {taps!r}")
    f = torch.tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


class EDMLinear(nn.Module):
    """y = x W^T + b with W (out_features, in_features) (EDM ``Linear``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gain: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(_xavier_uniform_(torch.empty(out_features, in_features), in_features, out_features, gain))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        x = x @ self.weight.to(x.dtype).t()
        return x + self.bias.to(x.dtype) if self.bias is not None else x


class EDMConv2d(nn.Module):
    """k x k convolution ('same' padding, k = 0: none) with optional 2x FIR up- or down-sampling (EDM ``Conv2d``).

    Unfused order: up-sample (transposed depthwise filter, gain 4) or down-sample (depthwise filter, stride 2), then
    the convolution. ``fused``: down-sampling after the convolution, up-sampling before it with padding
    max(f_pad - w_pad, 0) (EDM's ``fused_resample``, used by the NCSN++ residual encoder).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused: bool = False,
        gain: float = 1.0,
    ) -> None:
        super().__init__()
        if up and down:
            raise UserError("a convolution cannot both up- and down-sample: set at most one of up / down")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused = up, down, fused
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = (
            nn.Parameter(_xavier_uniform_(torch.empty(out_channels, in_channels, kernel, kernel), fan_in, fan_out, gain))
            if kernel
            else None
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        self.register_buffer("resample_filter", fir_filter_2d(resample_filter) if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused and self.up and w is not None:
            x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2,
                                   padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2,
                                       padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class EDMGroupNorm(nn.Module):
    """GroupNorm with G = min(32, channels // 4) groups (EDM ``GroupNorm``)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, num_groups: int = 32, min_per_group: int = 4) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_per_group)
        if self.num_groups < 1 or num_channels % self.num_groups:
            raise UserError(
                f"GroupNorm over {num_channels} channels needs at least {min_per_group} channels and a channel count "
                f"divisible by min(32, channels // {min_per_group}) = {self.num_groups}: choose model_channels / "
                "channel_mult so that every level has e.g. a multiple of 32 channels"
            )
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class SongUNetBlock(nn.Module):
    """One SongUNet residual block (module docstring) with EDM's names: norm0, conv0, affine, norm1, conv1, skip and,
    with attention, norm2, qkv, proj. SongUNet's settings are fixed: additive embedding (no adaptive scale), one
    attention head, 1x1 projection skips on resampling blocks, eps 1e-6, skips scaled by sqrt(1/2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        dropout: float = 0.0,
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout, self.attention = dropout, attention
        self.norm0 = EDMGroupNorm(in_channels)
        self.conv0 = EDMConv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = EDMLinear(emb_channels, out_channels)
        self.norm1 = EDMGroupNorm(out_channels)
        self.conv1 = EDMConv2d(out_channels, out_channels, 3, gain=1e-5)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = EDMConv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
        if attention:
            self.norm2 = EDMGroupNorm(out_channels)
            self.qkv = EDMConv2d(out_channels, 3 * out_channels, 1, gain=math.sqrt(0.2))
            self.proj = EDMConv2d(out_channels, out_channels, 1, gain=1e-5)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None].to(h.dtype)))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (self.skip(x) if self.skip is not None else x)) * SKIP_SCALE
        if not self.attention:
            return h
        b, c, height, width = h.shape
        # the fused qkv output is read as (B, C, 3, HW): channel i of q, k, v = output channels 3i, 3i+1, 3i+2
        q, k, v = self.qkv(self.norm2(h)).reshape(b, c, 3, height * width).unbind(2)
        weights = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(c)).softmax(dim=2).to(q.dtype)
        attended = torch.einsum("nqk,nck->ncq", weights, v).reshape(b, c, height, width)
        return (self.proj(attended) + h) * SKIP_SCALE


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar c: [sin(c w_k), cos(c w_k)], w_k = (1/max_positions)^(k / (n/2 - 1))
    (``endpoint``: the last frequency is exactly 1/max_positions). No parameters."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True) -> None:
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, c: Tensor) -> Tensor:
        half = self.num_channels // 2
        k = torch.arange(half, dtype=torch.float32, device=c.device) / (half - (1 if self.endpoint else 0))
        angles = torch.outer(c, ((1.0 / self.max_positions) ** k).to(c.dtype))
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar c: [sin(2 pi f c), cos(2 pi f c)] with a stored buffer ``freqs``
    (initialised N(0, scale^2))."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c: Tensor) -> Tensor:
        angles = torch.outer(c, (2 * math.pi * self.freqs).to(c.dtype))
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class SongUNet(nn.Module):
    """EDM's SongUNet (module docstring); called as ``net(x, c_noise, pos=None)`` and returns (B, out_channels, H, W).

    Args (EDM's names and defaults): img_resolution R (names only), in_channels (image + positional channels),
    out_channels, augment_dim (EDM's augmentation-label mapping, unused at inference), model_channels,
    channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout, embedding_type ('positional' |
    'fourier'), channel_mult_noise, encoder_type ('standard' | 'skip' | 'residual'), decoder_type
    ('standard' | 'skip'), resample_filter. Class labels (label_dim > 0) are refused.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        super().__init__()
        _check_kwargs(img_resolution, in_channels, out_channels, label_dim, channel_mult, num_blocks, dropout,
                      embedding_type, encoder_type, decoder_type)
        del label_dropout  # only meaningful with class labels, which are refused
        channel_mult = [int(m) for m in channel_mult]
        self.img_resolution, self.in_channels, self.out_channels = int(img_resolution), in_channels, out_channels
        self.levels = len(channel_mult)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)

        self.map_noise = (
            PositionalEmbedding(noise_channels) if embedding_type == "positional" else FourierEmbedding(noise_channels)
        )
        self.map_augment = EDMLinear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = EDMLinear(noise_channels, emb_channels)
        self.map_layer1 = EDMLinear(emb_channels, emb_channels)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        skip_channels = []
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = EDMConv2d(in_channels, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = SongUNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = EDMConv2d(caux, caux, 0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = EDMConv2d(caux, cout, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = EDMConv2d(
                        caux, cout, 3, down=True, resample_filter=resample_filter, fused=True
                    )
                    caux = cout
            skip_channels.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = SongUNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                skip_channels.append(cout)

        self.dec = nn.ModuleDict()
        for level in reversed(range(self.levels)):
            mult, res = channel_mult[level], self.img_resolution >> level
            if level == self.levels - 1:
                self.dec[f"{res}x{res}_in0"] = SongUNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = SongUNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = SongUNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = SongUNetBlock(cin, cout, attention=attn, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < self.levels - 1:
                    self.dec[f"{res}x{res}_aux_up"] = EDMConv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = EDMGroupNorm(cout)
                self.dec[f"{res}x{res}_aux_conv"] = EDMConv2d(cout, out_channels, 3, gain=1e-5)

    def forward(self, x: Tensor, noise_labels: Tensor, pos: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        if pos is not None:
            x = torch.cat([x, pos.to(x.dtype)], dim=1)
        factor = 2 ** (self.levels - 1)
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] % factor or x.shape[-2] % factor:
            raise UserError(
                f"SongUNet takes (B, {self.in_channels}, H, W) inputs (image and positional channels together) with H "
                f"and W divisible by {factor}, got {tuple(x.shape)}: pass pos= for a patch network and use patch "
                f"sizes that are multiples of {factor}"
            )
        emb = self.map_noise(noise_labels.reshape(-1).to(x.dtype))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux = [], x
        for name, module in self.enc.items():
            if "aux_down" in name:
                aux = module(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + module(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + module(aux)) * SKIP_SCALE
            else:
                x = module(x, emb) if isinstance(module, SongUNetBlock) else module(x)
                skips.append(x)

        out, tmp = None, None
        for name, module in self.dec.items():
            if "aux_up" in name:
                out = module(out)
            elif "aux_norm" in name:
                tmp = module(x)
            elif "aux_conv" in name:
                tmp = module(F.silu(tmp))
                out = tmp if out is None else tmp + out
            else:
                if x.shape[1] != module.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
        return out


def _check_kwargs(
    img_resolution: Any, in_channels: Any, out_channels: Any, label_dim: Any, channel_mult: Any, num_blocks: Any,
    dropout: Any, embedding_type: Any, encoder_type: Any, decoder_type: Any,
) -> None:
    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    for name, value in [("img_resolution", img_resolution), ("in_channels", in_channels),
                        ("out_channels", out_channels), ("num_blocks", num_blocks)]:
        if not positive_int(value):
            raise UserError(f"SongUNet {name} must be a positive int, got {value!r}")
    if label_dim:
        raise UserError(
            f"class-conditional SongUNet (label_dim={label_dim!r}) is not supported: PaDIS and the project's priors are "
            "unconditional; use a network trained with label_dim=0"
        )
    if isinstance(channel_mult, (str, bytes)) or not channel_mult or not all(positive_int(m) for m in channel_mult):
        raise UserError(f"SongUNet channel_mult must be a non-empty list of positive ints, got {channel_mult!r}")
    if img_resolution % 2 ** (len(channel_mult) - 1):
        raise UserError(
            f"SongUNet img_resolution {img_resolution} must be divisible by 2^{len(channel_mult) - 1} "
            f"({len(channel_mult)} levels of channel_mult)"
        )
    if not 0.0 <= float(dropout) < 1.0:
        raise UserError(f"SongUNet dropout must be in [0, 1), got {dropout!r}")
    for name, value, valid in [("embedding_type", embedding_type, EMBEDDING_TYPES),
                               ("encoder_type", encoder_type, ENCODER_TYPES),
                               ("decoder_type", decoder_type, DECODER_TYPES)]:
        if value not in valid:
            raise UserError(f"SongUNet {name} must be one of {list(valid)}, got {value!r}")


SONG_UNET_KWARGS = (
    "img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim", "model_channels", "channel_mult",
    "channel_mult_emb", "num_blocks", "attn_resolutions", "dropout", "label_dropout", "embedding_type",
    "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter",
)


def song_unet_from_kwargs(**init_kwargs: Any) -> SongUNet:
    """A :class:`SongUNet` from EDM's ``SongUNet`` init kwargs; unknown names are refused with the valid ones."""
    unknown = sorted(set(init_kwargs) - set(SONG_UNET_KWARGS))
    if unknown:
        raise UserError(
            f"unknown SongUNet argument(s) {unknown} (PaDIS's implicit_mlp=True variant is not supported); valid: "
            f"{list(SONG_UNET_KWARGS)}"
        )
    missing = [n for n in ("img_resolution", "in_channels", "out_channels") if n not in init_kwargs]
    if missing:
        raise UserError(f"SongUNet needs {missing}: set img_resolution (the canvas side R), in_channels, out_channels")
    return SongUNet(**init_kwargs)


class SongUNetPrecond(nn.Module):
    """EDM preconditioning around a network stored as ``model`` (EDM's ``EDMPrecond`` / PaDIS's
    ``Patch_EDMPrecond`` parameter names): with s = sigma, sd = sigma_data,

        D(x; s) = c_skip x + c_out F([c_in x, pos], c_noise),
        c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4.

    The positional channels ``pos`` are not scaled by c_in (PaDIS). Computed in float32, as EDM does (no fp16).
    """

    def __init__(self, model: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not float(sigma_data) > 0:
            raise UserError(f"sigma_data must be > 0, got {sigma_data!r}")
        self.model = model
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, sigma: Tensor | float, pos: Tensor | None = None) -> Tensor:
        c_skip, c_out, c_in, c_noise = edm_coefficients(x, sigma, self.sigma_data)
        return c_skip * x + c_out * self.model(c_in * x, c_noise, pos=pos)
