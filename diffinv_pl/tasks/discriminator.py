"""PatchGAN discriminator (pix2pix "NLayer", as used by the latent-diffusion autoencoders) and the hinge losses.

D maps model-space images (B, C, H, W) in [-1, 1] to a map of patch logits (B, 1, H', W'), each looking at a
receptive field of 70 x 70 px for ``n_layers=3`` (fewer for small images: ``n_layers`` = 1 or 2). Normalisation is
GroupNorm instead of pix2pix's BatchNorm, so a logit depends on its own image only (no batch statistics, no running
buffers: the discriminator is a pure function of its weights, which the generator term evaluates with detached
weights).

Hinge losses (Lim & Ye 2017; taming-transformers / LDM):

    L_D = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))        (discriminator)
    L_G = -mean D(x_rec)                                              (generator / autoencoder)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN: conv 4x4 stride 2 (``base_channels``), ``n_layers - 1`` more stride-2 convs doubling the channels
    (at most 8x), one stride-1 conv, and a 1-channel stride-1 output conv; LeakyReLU(0.2), GroupNorm. Weights
    N(0, 0.02) (norm scales N(1, 0.02)) drawn from a generator seeded by ``seed``."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, seed: int = 0) -> None:
        super().__init__()
        if n_layers < 1 or base_channels < 8 or base_channels % 8:
            raise ValueError(f"need n_layers >= 1 and base_channels a multiple of 8, got {n_layers}, {base_channels}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = base_channels
        for n in range(1, n_layers + 1):
            out = base_channels * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(8, out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.copy_(0.02 * torch.randn(m.weight.shape, generator=gen))
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.GroupNorm):
                    m.weight.copy_(1.0 + 0.02 * torch.randn(m.weight.shape, generator=gen))
                    m.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator term -mean D(x_rec)."""
    return -logits_fake.mean()
