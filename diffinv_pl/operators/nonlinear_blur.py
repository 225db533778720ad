"""Nonlinear blur: a learned blur operator in the style of bkse's KernelWizard (methods.md §1.2, §5.4, §7).

What the notes (methods.md) fix, and this module follows:

* the operator is bkse's ("blur kernel space exploring") KernelWizard with the pretrained ``GOPRO_wVAE.pth``;
* a *fixed* latent kernel code of shape 1x512x2x2 drawn with numpy seed 0 from N(0, 1.2^2)
  (``np.random.RandomState(0).randn(1, 512, 2, 2) * 1.2``), shared by the whole batch;
* the image is mapped from [-1, 1] to [0, 1] before the network and back to [-1, 1], clamped, after.

What is *our reading* (the notes do not describe the network's layers): bkse learns a kernel space with two parts,
an extractor that encodes a (sharp, blurred) pair into a kernel code and a blur operator ("adapter") that applies a
kernel code to a sharp image. Here:

* :class:`KernelExtractor`: the pair concatenated on channels -> 3x3 conv -> ``num_down`` stride-2 4x4 convs
  (channels doubling from ``nf`` up to ``kernel_dim``) -> residual blocks -> 1x1 conv -> adaptive average pooling to
  ``code_size x code_size``. With ``use_vae`` (the "wVAE" of the checkpoint name, read by us as a VAE-style encoder)
  it outputs a mean and a log-variance, and a code is the mean (or a reparameterised sample);
* :class:`KernelAdapter`: an encoder of the sharp image (3x3 conv, ``num_down`` stride-2 convs, ``front_blocks``
  residual blocks), ``back_blocks`` residual blocks whose first activation is modulated (per-pixel scale and shift,
  from a 1x1 conv of the kernel code bilinearly resized to the feature grid), a decoder (nearest up-sampling + 3x3
  convs) and an output that is added to the sharp image (the blur is predicted as a residual);
* default widths: ``kernel_dim`` 512 and ``code_size`` 2 are from the notes; ``nf`` 64, 7 extractor down-samplings
  (256 px -> 2x2, matching the code size on the DPS family's 256 px images), 2 adapter down-samplings and 4 + 4
  residual blocks are our choices.

Consequence: the layer names and shapes are ours, so the official ``GOPRO_wVAE.pth`` will in general *not* load into
this network; :func:`load_kernel_wizard_checkpoint` then fails with the full list of missing / unexpected / mis-shaped
keys (and accepts a ``rename`` map of key prefixes for a conversion). No code of the bkse repository was used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffinv_pl.operators.base import ForwardOperator

WEIGHTS_FILE = "GOPRO_wVAE.pth"
DEFAULT_WEIGHTS_PATH = os.path.join("weights", WEIGHTS_FILE)
_WRAPPER_KEYS = ("state_dict", "params", "params_ema", "model", "net", "netG", "network")


# ----------------------------------------------------------------------------------------------------------------------
# Network


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")


class ResBlock(nn.Module):
    """x + conv(lrelu(conv(x)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv3(channels, channels)
        self.conv2 = _conv3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(x), 0.2))


class ModulatedResBlock(nn.Module):
    """Residual block whose inner activation is scaled and shifted per pixel by the kernel code."""

    def __init__(self, channels: int, kernel_dim: int) -> None:
        super().__init__()
        self.conv1 = _conv3(channels, channels)
        self.conv2 = _conv3(channels, channels)
        self.modulation = nn.Conv2d(kernel_dim, 2 * channels, 1)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        scale, shift = self.modulation(code).chunk(2, dim=1)
        h = self.conv1(x) * (1 + scale) + shift
        return x + self.conv2(F.leaky_relu(h, 0.2))


class KernelExtractor(nn.Module):
    """(sharp, blurred) -> kernel code (B, kernel_dim, code_size, code_size) [VAE: mean and log-variance]."""

    def __init__(self, in_channels: int = 3, nf: int = 64, kernel_dim: int = 512, num_down: int = 7,
                 num_blocks: int = 2, code_size: int = 2, use_vae: bool = True) -> None:
        super().__init__()
        self.use_vae = use_vae
        self.head = _conv3(2 * in_channels, nf)
        downs, ch = [], nf
        for i in range(num_down):
            out = min(nf * 2 ** (i + 1), kernel_dim)
            downs.append(nn.Conv2d(ch, out, 4, stride=2, padding=1))
            ch = out
        self.downs = nn.ModuleList(downs)
        self.blocks = nn.Sequential(*[ResBlock(ch) for _ in range(num_blocks)])
        self.tail = nn.Conv2d(ch, kernel_dim * (2 if use_vae else 1), 1)
        self.pool = nn.AdaptiveAvgPool2d(code_size)

    def forward(self, sharp: Tensor, blurred: Tensor) -> tuple[Tensor, Tensor | None]:
        h = F.leaky_relu(self.head(torch.cat([sharp, blurred], dim=1)), 0.2)
        for down in self.downs:
            h = F.leaky_relu(down(h), 0.2)
        h = self.pool(self.tail(self.blocks(h)))
        if self.use_vae:
            mean, logvar = h.chunk(2, dim=1)
            return mean, logvar
        return h, None


class KernelAdapter(nn.Module):
    """(sharp image, kernel code) -> blurred image; fully convolutional, H and W multiples of 2**num_down."""

    def __init__(self, in_channels: int = 3, nf: int = 64, kernel_dim: int = 512, num_down: int = 2,
                 front_blocks: int = 4, back_blocks: int = 4) -> None:
        super().__init__()
        self.num_down = num_down
        self.head = _conv3(in_channels, nf)
        downs, ch = [], nf
        for _ in range(num_down):
            downs.append(nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1))
            ch *= 2
        self.downs = nn.ModuleList(downs)
        self.front = nn.Sequential(*[ResBlock(ch) for _ in range(front_blocks)])
        self.back = nn.ModuleList([ModulatedResBlock(ch, kernel_dim) for _ in range(back_blocks)])
        ups = []
        for _ in range(num_down):
            ups.append(_conv3(ch, ch // 2))
            ch //= 2
        self.ups = nn.ModuleList(ups)
        self.tail = _conv3(ch, in_channels)

    def forward(self, sharp: Tensor, code: Tensor) -> Tensor:
        factor = 2**self.num_down
        if sharp.shape[-2] % factor or sharp.shape[-1] % factor:
            raise ValueError(f"KernelAdapter needs H and W divisible by {factor}, got {tuple(sharp.shape[-2:])}")
        if code.shape[0] == 1 and sharp.shape[0] != 1:
            code = code.expand(sharp.shape[0], *code.shape[1:])
        h = F.leaky_relu(self.head(sharp), 0.2)
        for down in self.downs:
            h = F.leaky_relu(down(h), 0.2)
        h = self.front(h)
        code_map = F.interpolate(code.to(h.dtype), size=h.shape[-2:], mode="bilinear", align_corners=False)
        for block in self.back:
            h = block(h, code_map)
        for up in self.ups:
            h = F.leaky_relu(up(F.interpolate(h, scale_factor=2, mode="nearest")), 0.2)
        return sharp + self.tail(h)


class KernelWizard(nn.Module):
    """bkse-style blur-kernel-space network: ``encode`` (extractor) and ``adapt_kernel`` (blur operator).

    See the module docstring for which parts follow the notes and which are our reading. ``extractor_down`` and
    ``adapter_down`` are the numbers of stride-2 stages of the two parts.
    """

    def __init__(self, in_channels: int = 3, nf: int = 64, kernel_dim: int = 512, code_size: int = 2,
                 extractor_down: int = 7, extractor_blocks: int = 2, adapter_down: int = 2, front_blocks: int = 4,
                 back_blocks: int = 4, use_vae: bool = True) -> None:
        super().__init__()
        self.in_channels, self.kernel_dim, self.code_size = in_channels, kernel_dim, code_size
        self.extractor = KernelExtractor(in_channels, nf, kernel_dim, extractor_down, extractor_blocks, code_size,
                                         use_vae)
        self.adapter = KernelAdapter(in_channels, nf, kernel_dim, adapter_down, front_blocks, back_blocks)

    def encode(self, sharp: Tensor, blurred: Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> Tensor:
        """Kernel code of a (sharp, blurred) pair: the VAE mean, or a reparameterised sample with ``sample``."""
        mean, logvar = self.extractor(sharp, blurred)
        if not sample or logvar is None:
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def adapt_kernel(self, sharp: Tensor, code: Tensor) -> Tensor:
        """Blur ``sharp`` (B, C, H, W) in [0, 1] with kernel code (B or 1, kernel_dim, h, w)."""
        return self.adapter(sharp, code)

    def forward(self, sharp: Tensor, blurred: Tensor) -> Tensor:
        """Re-blur ``sharp`` with the kernel extracted from the pair (the training reconstruction)."""
        return self.adapt_kernel(sharp, self.encode(sharp, blurred))


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not match the network."""


def unwrap_state_dict(obj: Any, rename: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """State dict of an official-format checkpoint.

    Descends through wrapper keys (``state_dict``, ``params``, ``params_ema``, ``model``, ``net``, ``netG``,
    ``network``) until a flat mapping of tensors, strips ``module.`` prefixes (DataParallel / DDP) and applies the
    optional ``rename`` map of key prefixes (old prefix -> new prefix).
    """
    while isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))[:10]
            raise CheckpointMismatchError(
                f"checkpoint is not a state dict: entries {bad} are not tensors and none of the wrapper keys "
                f"{list(_WRAPPER_KEYS)} holds one"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        key = str(key)
        while key.startswith("module."):
            key = key[len("module."):]
        for old, new in (rename or {}).items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > limit else ''}]"


def load_kernel_wizard_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping,
                                  rename: Mapping[str, str] | None = None) -> nn.Module:
    """Load a checkpoint (path or loaded object) into ``model`` strictly; returns ``model``.

    The file is read with ``torch.load(..., weights_only=True)`` on the CPU. Missing keys, unexpected keys and shape
    mismatches raise :class:`CheckpointMismatchError` listing them; an unreadable file raises a RuntimeError naming it.
    """
    source = "checkpoint"
    if not isinstance(checkpoint, Mapping):
        source = str(checkpoint)
        try:
            checkpoint = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise RuntimeError(
                f"could not read the checkpoint {source!r} ({type(err).__name__}: {err}); the file may be truncated "
                f"or not a PyTorch state dict (expected the bkse KernelWizard checkpoint {WEIGHTS_FILE})"
            ) from err
    state = unwrap_state_dict(checkpoint, rename)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"{source} does not match the {type(model).__name__} architecture: missing keys {_listing(missing)}; "
            f"unexpected keys {_listing(unexpected)}; shape mismatches {_listing(mismatched)}. Check the network "
            "widths (operator.network=...) or pass a key-prefix rename map"
        )
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Operator


def kernel_code(kernel_dim: int = 512, code_size: int = 2, seed: int = 0, std: float = 1.2) -> Tensor:
    """The fixed latent kernel code: numpy ``RandomState(seed).randn(1, kernel_dim, s, s) * std`` (float32)."""
    draw = np.random.RandomState(seed).randn(1, kernel_dim, code_size, code_size) * std
    return torch.from_numpy(draw).to(torch.float32)


class NonlinearBlur(ForwardOperator):
    """y = clamp(2 F((x + 1) / 2, k) - 1, -1, 1), F the KernelWizard blur operator, k a fixed kernel code.

    Args:
        weights_path: the user-supplied bkse checkpoint ``GOPRO_wVAE.pth`` (required; never downloaded).
        image_size, channels: the signal is (channels, image_size, image_size) in [-1, 1].
        kernel_seed, kernel_std: the fixed code is ``RandomState(kernel_seed).randn(1, kernel_dim, 2, 2) *
            kernel_std`` (defaults 0 and 1.2, as the DPS family); replace it with :meth:`set_kernel_code`.
        network: keyword overrides for :class:`KernelWizard` (widths); the defaults are the ones described there.
        rename: optional key-prefix rename map applied when loading the checkpoint.
    """

    def __init__(self, weights_path: str | os.PathLike = DEFAULT_WEIGHTS_PATH, image_size: int = 256,
                 channels: int = 3, kernel_seed: int = 0, kernel_std: float = 1.2,
                 network: Mapping[str, Any] | None = None, rename: Mapping[str, str] | None = None) -> None:
        super().__init__()
        path = Path(os.path.expanduser(str(weights_path)))
        if not path.is_file():
            raise FileNotFoundError(
                f"nonlinear-blur weights not found at '{path}': this operator needs the bkse KernelWizard checkpoint "
                f"{WEIGHTS_FILE}, which cannot be downloaded here (no network access, no automatic downloads). "
                f"Obtain {WEIGHTS_FILE} yourself, put it at '{DEFAULT_WEIGHTS_PATH}' (relative to the working "
                f"directory) or anywhere else and set the path in the config: "
                f"operator.weights_path=/path/to/{WEIGHTS_FILE}"
            )
        self.weights_path = str(path)
        net_kwargs = dict(network or {})
        net_kwargs.setdefault("in_channels", channels)
        if net_kwargs["in_channels"] != channels:
            raise ValueError(f"network in_channels {net_kwargs['in_channels']} != operator channels {channels}")
        self.net = KernelWizard(**net_kwargs)
        load_kernel_wizard_checkpoint(self.net, path, rename)
        self.net.eval()
        self.net.requires_grad_(False)
        factor = 2**self.net.adapter.num_down
        if image_size % factor:
            raise ValueError(f"image_size {image_size} must be a multiple of {factor} (the adapter's down-sampling)")
        self.in_shape = self.out_shape = (channels, image_size, image_size)
        self.input_range = (-1.0, 1.0)
        self.register_buffer("kernel_code", kernel_code(self.net.kernel_dim, self.net.code_size, kernel_seed,
                                                        kernel_std))

    def train(self, mode: bool = True) -> NonlinearBlur:
        super().train(mode)
        self.net.eval()  # a fixed operator: never in training mode
        return self

    def set_kernel_code(self, code: Tensor) -> None:
        """Install a kernel code of shape (1 or B, kernel_dim, h, w)."""
        if code.ndim != 4 or code.shape[1] != self.net.kernel_dim:
            raise ValueError(f"kernel code must be (B, {self.net.kernel_dim}, h, w), got {tuple(code.shape)}")
        self.kernel_code = code.detach().to(device=self.kernel_code.device, dtype=self.kernel_code.dtype)

    def _forward(self, x: Tensor) -> Tensor:
        batch = x.shape[: x.ndim - 3]
        flat = x.reshape(-1, *self.in_shape)
        dtype = next(self.net.parameters()).dtype
        sharp = ((flat + 1) / 2).to(dtype)
        code = self.kernel_code
        if code.shape[0] not in (1, sharp.shape[0]):
            raise ValueError(f"kernel code batch {code.shape[0]} does not match the signal batch {sharp.shape[0]}")
        blurred = self.net.adapt_kernel(sharp, code)
        y = (2 * blurred - 1).clamp(-1, 1).to(x.dtype)
        return y.reshape(*batch, *self.out_shape)


__all__ = [
    "CheckpointMismatchError",
    "KernelAdapter",
    "KernelExtractor",
    "KernelWizard",
    "NonlinearBlur",
    "kernel_code",
    "load_kernel_wizard_checkpoint",
    "unwrap_state_dict",
]
