"""Image denoiser backbones built on diffusers' ``UNet2DModel``; they know nothing of noise parameterisation.

A backbone is called as ``net(x_in, c_noise, pos=None)`` with ``x_in`` (B, C, H, W) (already scaled by c_in by the
preconditioning wrapper), ``c_noise`` (B,) the wrapper's noise conditioning (ln(sigma)/4 for EDM, 999 t for VP), and
for patch models ``pos`` (B, 2, H, W) positional channels that are concatenated to the input unscaled (PaDIS,
methods.md §3.2). It returns the raw output F of shape (B, C, H, W).

DDPM++ (EDM's ``SongUNet``, PaDIS's default) expressed with diffusers (``ddpmpp_config``): model_channels 128 with
channel_mult [2, 2, 2] = three levels of 256 channels, 4 residual blocks per level, sinusoidal ("positional") noise
embedding, GroupNorm(32, eps 1e-6), dropout, no self-attention at patch resolutions. Differences we accept: diffusers
down-samples with a stride-2 convolution instead of SongUNet's [1, 1] FIR resample filter, and its skip connections
are not scaled by 1/sqrt(2); a PaDIS checkpoint (EDM pickle) therefore does not load into this backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn


class UNetDenoiserNet(nn.Module):
    """diffusers ``UNet2DModel`` with optional conditioning channels (module docstring).

    Args:
        image_channels: channels C of the image (or patch) being denoised; also the output channels.
        cond_channels: extra input channels concatenated to the image (2 for PaDIS positional channels, else 0).
        block_out_channels: channels per resolution level (one down-sampling between consecutive levels).
        layers_per_block: residual blocks per level.
        attention_levels: indices of the levels with self-attention (none in PaDIS's configuration).
        mid_attention: self-attention in the bottleneck block.
        dropout: dropout probability in the residual blocks.
        norm_num_groups, norm_eps: GroupNorm parameters (every entry of ``block_out_channels`` must be divisible
            by ``norm_num_groups``).
    """

    def __init__(
        self,
        image_channels: int = 1,
        cond_channels: int = 0,
        block_out_channels: Sequence[int] = (256, 256, 256),
        layers_per_block: int = 4,
        attention_levels: Sequence[int] = (),
        mid_attention: bool = False,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in block_out_channels)
        if image_channels < 1 or cond_channels < 0 or not channels or layers_per_block < 1:
            raise ValueError(
                "need image_channels >= 1, cond_channels >= 0, non-empty block_out_channels and layers_per_block >= 1, "
                f"got {image_channels}, {cond_channels}, {channels}, {layers_per_block}"
            )
        bad = [c for c in channels if c % norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {channels} must be divisible by norm_num_groups={norm_num_groups}")
        levels = set(int(i) for i in attention_levels)
        if not levels <= set(range(len(channels))):
            raise ValueError(f"attention_levels {sorted(levels)} must lie in 0..{len(channels) - 1}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.image_channels = image_channels
        self.cond_channels = cond_channels
        self.num_levels = len(channels)
        down = tuple("AttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(len(channels)))
        up = tuple("AttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(len(channels))))
        self.unet = UNet2DModel(
            in_channels=image_channels + cond_channels,
            out_channels=image_channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=channels,
            layers_per_block=layers_per_block,
            add_attention=mid_attention,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            time_embedding_type="positional",
            flip_sin_to_cos=True,
            freq_shift=0,
        )

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this (one halving per level transition)."""
        return 2 ** (self.num_levels - 1)

    def forward(self, x: Tensor, c_noise: Tensor, pos: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise ValueError(
                f"expected (B, {self.image_channels}, H, W) input, got {tuple(x.shape)}; image_channels of the model "
                "must equal the data's channel count"
            )
        m = self.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be a multiple of {m} for this {self.num_levels}-level U-Net")
        if self.cond_channels:
            if pos is None or pos.shape != (x.shape[0], self.cond_channels, *x.shape[-2:]):
                got = None if pos is None else tuple(pos.shape)
                raise ValueError(
                    f"this network needs {self.cond_channels} conditioning (positional) channels of shape "
                    f"{(x.shape[0], self.cond_channels, *x.shape[-2:])}, got {got}"
                )
            x = torch.cat([x, pos.to(x.dtype)], dim=1)
        elif pos is not None:
            raise ValueError("this network has no conditioning channels (cond_channels=0) but pos was given")
        return self.unet(x, c_noise.to(x.dtype).reshape(-1).expand(x.shape[0])).sample
