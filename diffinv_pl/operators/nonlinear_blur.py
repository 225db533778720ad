"""Nonlinear blur: bkse's KernelWizard with the pretrained ``GOPRO_wVAE.pth`` (methods.md §1.2, §5.4, §7).

The operator of the DPS family (DPS ``nonlinear_blur``, DAPS ``nonlinear_blur``):

* ``y = clamp(2 G((x + 1) / 2, k) - 1, -1, 1)`` with ``G = KernelWizard.adaptKernel`` of bkse
  (VinAIResearch/blur-kernel-space-exploring) loaded from ``GOPRO_wVAE.pth``;
* ``k`` a *fixed* latent kernel code of shape 1x512x2x2, ``np.random.RandomState(0).randn(1, 512, 2, 2) * 1.2``
  (DAPS: ``np.random.seed(0); np.random.randn(1, 512, 2, 2) * 1.2``), shared by the whole batch. (DPS itself draws a
  fresh ``torch.randn(1, 512, 2, 2) * 1.2`` at every call; the notes fix the DAPS convention.)

Network: a re-implementation (our own code, no bkse text) of the module tree of bkse's ``KernelWizard`` with the
options of ``options/generate_blur/default.yml`` (``input_nc 3, nf 64, front_RBs 10, back_RBs 20, kernel_dim 512,
use_vae true``; ``KernelExtractor: norm none, use_sharp true, n_blocks 4, padding_type reflect, use_dropout false``;
``Adapter: norm none, use_dropout false``; ``N_frames`` is not read by the network). Parameter names and shapes are
those of the bkse module tree, so the official file loads with ``load_state_dict(strict=True)``. Sources read:

* ``VinAIResearch/blur-kernel-space-exploring``: ``models/kernel_encoding/kernel_wizard.py`` (commits d85fbe89 and
  30c32054, identical network), ``options/generate_blur/default.yml`` (ec0fc962), ``models/arch_util.py`` (1b04d1cb:
  ``get_norm_layer('none')`` returns a plain function, so ``use_bias`` is False for the extractor and the U-Net
  convs), ``models/resnet.py`` (1b04d1cb; later ``models/backbones/resnet.py``) and ``models/unet_parts.py``
  (79799c0a: 4x4 ConvTranspose2d up-sampling);
* the vendored copies of bkse in ``alexdenker/DEFT`` (``bkse/models/backbones/unet_parts.py`` -- the same
  ConvTranspose2d variant --, ``resnet.py``, ``arch_util.py``, ``kernel_encoding/kernel_wizard.py``, at 80035b33) and
  ``zhangbingliang2019/DAPS`` (``forward_operator/bkse/models/kernel_encoding/kernel_wizard.py``,
  ``backbones/resnet.py``, ``options/generate_blur/default.yml``, ``forward_operator/__init__.py``), the printed
  adapter tree in ``YYyyy606/MGW-Deblur`` ``models/backbones/unet_parts.py`` (ConvTranspose2d, same channels), and
  ``DPS2022/diffusion-posterior-sampling`` ``guided_diffusion/measurements.py`` (4962d6e8). DPS and DAPS load the file
  with ``KernelWizard(opt).load_state_dict(torch.load(path))`` (a flat state dict, strict, no wrapper key; bkse's
  ``save_network`` strips DataParallel's ``module.``) and call ``adaptKernel(x_in_0_1, kernel=code)``.

The tree (``nf`` = 64; keys in brackets; LReLU 0.1 in the feature extractor and the reconstruction trunk):

* ``feature_extractor`` (Sequential): [0] 3x3 conv C->nf, LReLU, [2] 3x3 stride-2 conv, LReLU, [4] 3x3 stride-2 conv,
  LReLU, [6 .. 6+front_RBs-1] residual blocks ``x + conv2(relu(conv1(x)))`` (3x3 convs with bias);
* ``kernel_extractor.model`` (Sequential, convs without bias, norm layers are parameter-free identities): [0] reflect
  pad 3, [1] 7x7 conv 2nf->nf, [2] norm, ReLU, then 5 x ([3i+4] 3x3 stride-2 conv ``min(nf 2^i, 2K)`` ->
  ``min(nf 2^(i+1), 2K)``, norm, ReLU) with K = kernel_dim, then [19 .. 22] residual blocks ``x + block(x)`` with
  ``conv_block`` = [reflect pad 1, [1] 3x3 conv, norm, ReLU, reflect pad 1, [5] 3x3 conv, norm]; the output is split
  into the VAE mean and log-variance (K channels each). Used only by ``forward`` (kernel encoding), not by the
  operator;
* ``adapter.model``: a 5-level U-Net of ``down`` / ``submodule`` / ``up`` blocks with channels nf -> nf -> 2nf -> 4nf
  -> 8nf -> 8nf (4x4 stride-2 convs down, 4x4 stride-2 transposed convs up, no bias except the outermost transposed
  conv). The innermost block concatenates the kernel code (8nf = 512 channels, 1/128 of the image size: 2x2 at 256
  px) to its down-sampled features; every inner block returns ``cat(up(...), lrelu_0.2(x))``: bkse's down path starts
  with an *in-place* LeakyReLU(0.2), so its skip branch carries the activated input, which we reproduce explicitly;
  the outermost block ends in ReLU -> transposed conv -> tanh and has no skip;
* ``recon_trunk`` (Sequential, B = back_RBs = 20): [0 .. B-1] residual blocks, [B] 3x3 conv nf->4nf, pixel shuffle
  2, LReLU, [B+3] 3x3 conv nf->4*64, pixel shuffle 2, LReLU, [B+6] 3x3 conv 64->64, LReLU, [B+8] 3x3 conv 64->C (the
  64 are constants in bkse: ``tail_nf``);
* ``adaptKernel(x, k) = x + recon_trunk(adapter(feature_extractor(x), k))``.

Defaults equal the official options; the widths (``nf``, ``front_blocks``, ``back_blocks``, ``kernel_dim``,
``extractor_blocks``, ``tail_nf``) can be reduced for tests. The official file holds 159 tensors (see the golden list
in ``tests/test_kernels_nonlinear_blur.py``).

Unverified here (no copy of ``GOPRO_wVAE.pth`` was available, and bkse's own ``models/backbones/unet_parts.py`` at
its head commit is not in the code index we searched): that the released file's keys and shapes are exactly the ones
above. The index also holds another revision of bkse's ``models/unet_parts.py`` (1b04d1cb) whose up-sampling is a
bilinear ``nn.Upsample`` + ``DoubleConv`` (keys ``up.1.double_conv.{0,2}.*``); every post-``backbones`` copy we
found uses ConvTranspose2d, which we follow. Only loading the real file confirms it (a mismatch raises
:class:`CheckpointMismatchError` listing the keys). Also unverified: agreement of our outputs with the bkse code on
the real weights (the forward follows the source read, including the in-place activation on the skip).
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

from diffinv_pl.errors import UserFileError
from diffinv_pl.operators.base import ForwardOperator

WEIGHTS_FILE = "GOPRO_wVAE.pth"
DEFAULT_WEIGHTS_PATH = os.path.join("weights", WEIGHTS_FILE)
_WRAPPER_KEYS = ("state_dict", "params", "params_ema", "model", "net", "netG", "network")
#: the image side must be a multiple of this: 4 (two stride-2 feature convs) x 32 (five U-Net levels)
SIZE_MULTIPLE = 128
#: the sub-options of bkse's ``generate_blur/default.yml`` (the only configuration implemented)
_RELEASED_OPTIONS = {"KernelExtractor.norm": "none", "KernelExtractor.use_sharp": True,
                     "KernelExtractor.padding_type": "reflect", "KernelExtractor.use_dropout": False,
                     "Adapter.norm": "none", "Adapter.use_dropout": False}


# ----------------------------------------------------------------------------------------------------------------------
# Network


class ResidualBlockNoBN(nn.Module):
    """``x + conv2(relu(conv1(x)))`` with 3x3 convs with bias (keys ``conv1``, ``conv2``)."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv2 = nn.Conv2d(nf, nf, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class ExtractorResBlock(nn.Module):
    """``x + conv_block(x)``; ``conv_block`` holds reflect-padded 3x3 convs without bias at indices 1 and 5.

    The identities at 2 and 6 stand for bkse's norm layers with ``norm: none`` (parameter-free).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), nn.Identity(), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), nn.Identity(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)


class KernelExtractor(nn.Module):
    """Features of (sharp, blurred) -> kernel code: (mean, log-variance) with ``kernel_dim`` channels each (VAE)."""

    num_down = 5

    def __init__(self, nf: int = 64, kernel_dim: int = 512, use_vae: bool = True, num_blocks: int = 4) -> None:
        super().__init__()
        self.kernel_dim, self.use_vae = kernel_dim, use_vae
        out_channels = 2 * kernel_dim if use_vae else kernel_dim
        if nf * 2**self.num_down < out_channels:
            raise ValueError(f"KernelExtractor needs nf * 32 >= {out_channels} output channels, got nf={nf}")
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(2 * nf, nf, 7, bias=False), nn.Identity(),
                                   nn.ReLU()]
        for i in range(self.num_down):
            cin, cout = min(nf * 2**i, out_channels), min(nf * 2 ** (i + 1), out_channels)
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.Identity(), nn.ReLU()]
        layers += [ExtractorResBlock(out_channels) for _ in range(num_blocks)]
        self.model = nn.Sequential(*layers)

    def forward(self, sharp_features: Tensor, blurred_features: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(torch.cat((sharp_features, blurred_features), dim=1))
        if self.use_vae:
            return out[:, : self.kernel_dim], out[:, self.kernel_dim:]
        return out, torch.zeros_like(out)


class UNetLevel(nn.Module):
    """One level of the kernel adapter's U-Net (keys ``down.*``, ``submodule.*``, ``up.*``).

    * outermost: ``up(submodule(down(x), code))`` with ``down`` = [conv] and ``up`` = [ReLU, transposed conv with bias,
      tanh];
    * inner levels: ``a = lrelu_0.2(x)``, ``down`` = [LReLU, conv, identity (norm)] (innermost: no identity),
      ``up`` = [ReLU, transposed conv, identity (norm)], output ``cat(up(inner), a)`` where ``inner`` is
      ``submodule(down(x), code)``, or ``cat(down(x), code)`` at the innermost level. The skip carries ``a``, not
      ``x``: bkse's LeakyReLU is in place and overwrites ``x`` before the concatenation.
    """

    def __init__(self, outer: int, inner: int, submodule: UNetLevel | None = None, outermost: bool = False) -> None:
        super().__init__()
        self.outermost, self.innermost = outermost, submodule is None
        if outermost and submodule is None:
            raise ValueError("the outermost U-Net level needs a submodule")
        down_conv = nn.Conv2d(outer, inner, 4, stride=2, padding=1, bias=False)
        up_conv = nn.ConvTranspose2d(2 * inner, outer, 4, stride=2, padding=1, bias=outermost)
        # registered in bkse's order (down, submodule, up), so state_dict() lists the keys as the official file
        if outermost:
            self.down = nn.Sequential(down_conv)
        else:
            self.down = nn.Sequential(nn.LeakyReLU(0.2), down_conv, *([] if self.innermost else [nn.Identity()]))
        if submodule is not None:
            self.submodule = submodule
        self.up = nn.Sequential(nn.ReLU(), up_conv, nn.Tanh() if outermost else nn.Identity())

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        if self.outermost:
            return self.up(self.submodule(self.down(x), code))
        act = self.down[0](x)
        h = act
        for layer in list(self.down)[1:]:
            h = layer(h)
        if self.innermost:
            if code.shape[1:] != h.shape[1:]:
                raise ValueError(
                    f"kernel code of shape {tuple(code.shape)} does not fit the adapter's innermost features "
                    f"{tuple(h.shape)}: it needs {h.shape[1]} channels and 1/{SIZE_MULTIPLE} of the image size"
                )
            inner = torch.cat((h, code.to(h.dtype)), dim=1)
        else:
            inner = self.submodule(h, code)
        return torch.cat((self.up(inner), act), dim=1)


class KernelAdapter(nn.Module):
    """The blur operator's U-Net: features (nf channels) and a kernel code (8 nf channels) -> features (nf channels)."""

    def __init__(self, nf: int = 64) -> None:
        super().__init__()
        level = UNetLevel(8 * nf, 8 * nf)
        level = UNetLevel(4 * nf, 8 * nf, level)
        level = UNetLevel(2 * nf, 4 * nf, level)
        level = UNetLevel(nf, 2 * nf, level)
        self.model = UNetLevel(nf, nf, level, outermost=True)

    def forward(self, features: Tensor, code: Tensor) -> Tensor:
        return self.model(features, code)


class KernelWizard(nn.Module):
    """bkse's KernelWizard: ``adapt_kernel`` (alias ``adaptKernel``) blurs, ``forward`` encodes a kernel.

    Args (bkse option names in brackets; defaults are those of ``GOPRO_wVAE.pth``):
        in_channels [input_nc]: image channels (3).
        nf [nf]: feature width (64); the kernel code has ``8 nf`` channels.
        front_blocks [front_RBs]: residual blocks of the feature extractor (10).
        back_blocks [back_RBs]: residual blocks of the reconstruction trunk (20).
        kernel_dim [kernel_dim]: channels of the encoded kernel (512).
        use_vae [use_vae]: the extractor outputs a mean and a log-variance (True).
        extractor_blocks [KernelExtractor.n_blocks]: residual blocks of the kernel extractor (4).
        tail_nf: width of the last up-sampling stage, the constant 64 in bkse (change it for small tests only).
    """

    def __init__(self, in_channels: int = 3, nf: int = 64, front_blocks: int = 10, back_blocks: int = 20,
                 kernel_dim: int = 512, use_vae: bool = True, extractor_blocks: int = 4, tail_nf: int = 64) -> None:
        super().__init__()
        self.in_channels, self.nf, self.kernel_dim = in_channels, nf, kernel_dim
        self.code_channels = 8 * nf
        lrelu = nn.LeakyReLU(0.1)
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(in_channels, nf, 3, padding=1), lrelu,
            nn.Conv2d(nf, nf, 3, stride=2, padding=1), lrelu,
            nn.Conv2d(nf, nf, 3, stride=2, padding=1), lrelu,
            *[ResidualBlockNoBN(nf) for _ in range(front_blocks)],
        )
        self.kernel_extractor = KernelExtractor(nf, kernel_dim, use_vae, extractor_blocks)
        self.adapter = KernelAdapter(nf)
        self.recon_trunk = nn.Sequential(
            *[ResidualBlockNoBN(nf) for _ in range(back_blocks)],
            nn.Conv2d(nf, 4 * nf, 3, padding=1), nn.PixelShuffle(2), lrelu,
            nn.Conv2d(nf, 4 * tail_nf, 3, padding=1), nn.PixelShuffle(2), lrelu,
            nn.Conv2d(tail_nf, tail_nf, 3, padding=1), lrelu,
            nn.Conv2d(tail_nf, in_channels, 3, padding=1),
        )

    @classmethod
    def from_bkse_options(cls, opt: Mapping[str, Any], **overrides: Any) -> KernelWizard:
        """Build from the ``KernelWizard`` section of a bkse option file (e.g. ``generate_blur/default.yml``).

        Only the options of the released checkpoints are supported (norm ``none``, ``use_sharp``, reflect padding,
        no dropout); ``pretrained`` and ``N_frames`` are ignored.
        """
        ext, ada = dict(opt.get("KernelExtractor", {})), dict(opt.get("Adapter", {}))
        given = {"KernelExtractor.norm": ext.get("norm", "none"),
                 "KernelExtractor.use_sharp": ext.get("use_sharp", True),
                 "KernelExtractor.padding_type": ext.get("padding_type", "reflect"),
                 "KernelExtractor.use_dropout": ext.get("use_dropout", False), "Adapter.norm": ada.get("norm", "none"),
                 "Adapter.use_dropout": ada.get("use_dropout", False)}
        unsupported = {k: v for k, v in given.items() if v != _RELEASED_OPTIONS[k]}
        if unsupported:
            raise ValueError(f"unsupported bkse KernelWizard options {unsupported}: only the released configuration "
                             f"{_RELEASED_OPTIONS} is implemented")
        kwargs: dict[str, Any] = dict(in_channels=opt.get("input_nc", 3), nf=opt.get("nf", 64),
                                      front_blocks=opt.get("front_RBs", 10), back_blocks=opt.get("back_RBs", 20),
                                      kernel_dim=opt.get("kernel_dim", 512), use_vae=opt.get("use_vae", True),
                                      extractor_blocks=ext.get("n_blocks", 4))
        kwargs.update(overrides)
        return cls(**kwargs)

    def adapt_kernel(self, sharp: Tensor, code: Tensor) -> Tensor:
        """Blur ``sharp`` (B, C, H, W) in [0, 1] with a kernel code (1 or B, 8 nf, H/128, W/128); H, W multiples of
        128. Not clamped (the operator clamps)."""
        if sharp.ndim != 4 or sharp.shape[-2] % SIZE_MULTIPLE or sharp.shape[-1] % SIZE_MULTIPLE:
            raise ValueError(f"KernelWizard needs (B, C, H, W) images with H and W multiples of {SIZE_MULTIPLE}, "
                             f"got {tuple(sharp.shape)}")
        if code.ndim != 4 or code.shape[0] not in (1, sharp.shape[0]):
            raise ValueError(f"kernel code must be (1 or {sharp.shape[0]}, {self.code_channels}, h, w), "
                             f"got {tuple(code.shape)}")
        if code.shape[0] != sharp.shape[0]:
            code = code.expand(sharp.shape[0], *code.shape[1:])
        out = self.recon_trunk(self.adapter(self.feature_extractor(sharp), code))
        return out + sharp

    adaptKernel = adapt_kernel  # noqa: N815 - bkse's name, as called by DPS / DAPS

    def forward(self, sharp: Tensor, blurred: Tensor) -> tuple[Tensor, Tensor]:
        """bkse's forward: the kernel code of a (sharp, blurred) pair as (mean, log-variance)."""
        return self.kernel_extractor(self.feature_extractor(sharp), self.feature_extractor(blurred))

    def encode(self, sharp: Tensor, blurred: Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> Tensor:
        """Kernel code of a pair: the mean, or with ``sample`` a reparameterised draw ``mean + exp(logvar / 2) n``
        (our convenience; not used by the operator)."""
        mean, logvar = self(sharp, blurred)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise


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

    The file is read with ``torch.load(..., weights_only=True)`` on the CPU (the official file is a flat state dict, as
    DPS / DAPS load it; wrapper keys and ``module.`` prefixes are accepted too). A ``model`` built on the meta device
    receives the checkpoint's tensors (``assign``). Missing keys, unexpected keys and shape mismatches raise
    :class:`CheckpointMismatchError` listing them; an unreadable file raises a RuntimeError naming it.
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
    on_meta = any(t.is_meta for t in expected.values())
    if on_meta and any(state[k].is_meta for k in expected):
        raise CheckpointMismatchError(f"{source} holds meta tensors (no data)")
    model.load_state_dict(state, strict=True, assign=on_meta)  # meta: take the checkpoint's tensors as stored
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Operator


def kernel_code(kernel_dim: int = 512, code_size: int = 2, seed: int = 0, std: float = 1.2) -> Tensor:
    """The fixed latent kernel code: numpy ``RandomState(seed).randn(1, kernel_dim, s, s) * std`` (float32)."""
    draw = np.random.RandomState(seed).randn(1, kernel_dim, code_size, code_size) * std
    return torch.from_numpy(draw).to(torch.float32)


class NonlinearBlur(ForwardOperator):
    """y = clamp(2 G((x + 1) / 2, k) - 1, -1, 1), G bkse's ``KernelWizard.adaptKernel``, k a fixed kernel code.

    Args:
        weights_path: the user-supplied bkse checkpoint ``GOPRO_wVAE.pth`` (required; never downloaded).
        image_size, channels: the signal is (channels, image_size, image_size) in [-1, 1]; image_size a multiple of
            128 (256 in the DPS family).
        kernel_seed, kernel_std: the fixed code is ``RandomState(kernel_seed).randn(1, 8 nf, s, s) * kernel_std`` with
            ``s = image_size / 128`` (defaults: 0, 1.2 and 1x512x2x2, as DAPS); replace it with
            :meth:`set_kernel_code`.
        network: keyword overrides for :class:`KernelWizard` (widths, for tests); the defaults are the official options
            of ``GOPRO_wVAE.pth``.
        rename: optional key-prefix rename map applied when loading the checkpoint.
    """

    def __init__(self, weights_path: str | os.PathLike = DEFAULT_WEIGHTS_PATH, image_size: int = 256,
                 channels: int = 3, kernel_seed: int = 0, kernel_std: float = 1.2,
                 network: Mapping[str, Any] | None = None, rename: Mapping[str, str] | None = None) -> None:
        super().__init__()
        path = Path(os.path.expanduser(str(weights_path)))
        if not path.is_file():
            raise UserFileError(
                f"nonlinear-blur weights not found at '{path}': this operator needs the pretrained bkse KernelWizard "
                f"checkpoint {WEIGHTS_FILE} (GOPRO, with VAE) of VinAIResearch/blur-kernel-space-exploring, the file "
                f"DPS and DAPS use, which cannot be downloaded here (no network access, no automatic downloads). "
                f"Obtain {WEIGHTS_FILE} yourself (the links are in the bkse README), put it at "
                f"'{DEFAULT_WEIGHTS_PATH}' (relative to the working directory) or anywhere else and set the path in "
                f"the config: operator.weights_path=/path/to/{WEIGHTS_FILE}"
            )
        if image_size % SIZE_MULTIPLE:
            raise ValueError(f"image_size {image_size} must be a multiple of {SIZE_MULTIPLE} (KernelWizard "
                             "down-samples by 4 in the feature extractor and by 32 in the adapter)")
        self.weights_path = str(path)
        net_kwargs = dict(network or {})
        net_kwargs.setdefault("in_channels", channels)
        if net_kwargs["in_channels"] != channels:
            raise ValueError(f"network in_channels {net_kwargs['in_channels']} != operator channels {channels}")
        with torch.device("meta"):  # no random initialisation: every tensor comes from the checkpoint
            self.net = KernelWizard(**net_kwargs)
        load_kernel_wizard_checkpoint(self.net, path, rename)
        self.net.float()  # as DPS / DAPS, which copy the file into a float32 network
        self.net.eval()
        self.net.requires_grad_(False)
        self.in_shape = self.out_shape = (channels, image_size, image_size)
        self.input_range = (-1.0, 1.0)
        self.register_buffer("kernel_code", kernel_code(self.net.code_channels, image_size // SIZE_MULTIPLE,
                                                        kernel_seed, kernel_std))

    def train(self, mode: bool = True) -> NonlinearBlur:
        super().train(mode)
        self.net.eval()  # a fixed operator: never in training mode
        return self

    def set_kernel_code(self, code: Tensor) -> None:
        """Install a kernel code of shape (1 or B, 8 nf, image_size / 128, image_size / 128)."""
        side = self.in_shape[-1] // SIZE_MULTIPLE
        if code.ndim != 4 or tuple(code.shape[1:]) != (self.net.code_channels, side, side):
            raise ValueError(f"kernel code must be (B, {self.net.code_channels}, {side}, {side}), "
                             f"got {tuple(code.shape)}")
        self.kernel_code = code.detach().to(device=self.kernel_code.device, dtype=self.kernel_code.dtype)

    def _forward(self, x: Tensor) -> Tensor:
        batch = x.shape[: x.ndim - 3]
        flat = x.reshape(-1, *self.in_shape)
        dtype = next(self.net.parameters()).dtype
        sharp = ((flat + 1) / 2).to(dtype)
        code = self.kernel_code.to(dtype)
        if code.shape[0] not in (1, sharp.shape[0]):
            raise ValueError(f"kernel code batch {code.shape[0]} does not match the signal batch {sharp.shape[0]}")
        blurred = self.net.adapt_kernel(sharp, code)
        y = (2 * blurred - 1).clamp(-1, 1).to(x.dtype)
        return y.reshape(*batch, *self.out_shape)


__all__ = [
    "SIZE_MULTIPLE",
    "CheckpointMismatchError",
    "ExtractorResBlock",
    "KernelAdapter",
    "KernelExtractor",
    "KernelWizard",
    "NonlinearBlur",
    "ResidualBlockNoBN",
    "UNetLevel",
    "kernel_code",
    "load_kernel_wizard_checkpoint",
    "unwrap_state_dict",
]
