"""A compact re-implementation of openai/guided-diffusion's ``UNetModel``, for tests only.

Written from ``guided_diffusion/unet.py`` and ``nn.py`` (ResBlock with ``use_scale_shift_norm=True`` and
``resblock_updown=True``, AttentionBlock with ``QKVAttentionLegacy`` (heads split before q/k/v), timestep_embedding,
GroupNorm32), with the same module names so that ``state_dict()`` has the key layout of the released files
(``ffhq_10m.pt``, ``256x256_diffusion_uncond.pt``). Only the options those files use are kept: 2-D, unconditional,
no dropout, no gradient checkpointing, float32. ``attention_resolutions`` are downsampling rates (ds), as the
``UNetModel`` constructor takes them (``script_util`` converts pixel resolutions r to ds = image_size // r).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the LDM U-Net derives from guided-diffusion: the same timestep embedding, GroupNorm32 and legacy-qkv attention
from compvis_reference import AttentionBlock, timestep_embedding
from compvis_reference import norm32 as normalization


class ResBlock(nn.Module):
    """Scale-shift ResBlock: h = conv1(act(norm1(x))) (resampled between act and conv when up/down), then
    h = conv2(act(norm2(h) * (1 + scale) + shift)) with (scale, shift) = chunk(emb_layers(emb), 2); out = skip(x) + h
    (x resampled the same way)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, up: bool = False,
                 down: bool = False) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.up, self.down = up, down
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")  # Upsample(use_conv=False)
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)  # Downsample(use_conv=False)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers[2](self._resample(self.in_layers[1](self.in_layers[0](x))))
        x = self._resample(x)
        scale, shift = torch.chunk(self.emb_layers(emb)[..., None, None], 2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(nn.Module):
    """guided-diffusion UNetModel (unconditional, num_head_channels given, scale-shift norm, resblock up/down,
    legacy attention). ``out_channels`` = 2 * in_channels for learn_sigma models (eps, then the variance logits)."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_resolutions: tuple[int, ...], channel_mult: tuple[int, ...],
                 num_head_channels: int) -> None:
        super().__init__()
        self.model_channels = model_channels
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_head_channels))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(ResBlock(ch, emb, ch, down=True)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb, ch), AttentionBlock(ch, num_head_channels),
                                                    ResBlock(ch, emb, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_head_channels))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, up=True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
