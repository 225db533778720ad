"""SongUNet with EDM's parameter names: the PaDIS golden key/parameter count, resampling, block and embedding maths,
the EDM preconditioning formula, and clear errors for bad configurations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffinv_pl.diffusion.preconditioning import EDMPrecond
from diffinv_pl.errors import UserError
from diffinv_pl.priors.song_unet import (
    EDMConv2d,
    PositionalEmbedding,
    SongUNetBlock,
    SongUNetPrecond,
    song_unet_from_kwargs,
)

# PaDIS's --arch=ddpmpp network on the 384 x 384 canvas (256 + 2 * 64), methods.md §0.5 / §3.2
PADIS_KWARGS = dict(
    img_resolution=384, in_channels=3, out_channels=1, model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
    attn_resolutions=[16], embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
    decoder_type="standard", resample_filter=[1, 1], dropout=0.05,
)
TINY_KWARGS = dict(
    img_resolution=32, in_channels=3, out_channels=1, model_channels=16, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[16], dropout=0.0,
)


def test_padis_golden_state_dict_on_meta_device():
    with torch.device("meta"):
        net = SongUNetPrecond(song_unet_from_kwargs(**PADIS_KWARGS))
    state = net.state_dict()
    assert len(state) == 394
    assert sum(p.numel() for p in net.parameters()) == 54_409_729
    # the 8 persistent FIR buffers (2x2 each) of the 2 down and 2 up blocks (conv0 and skip) are the only buffers
    assert sum(v.numel() for v in state.values()) == 54_409_729 + 8 * 4
    assert tuple(state["model.enc.384x384_conv.weight"].shape) == (128, 3, 3, 3)
    assert tuple(state["model.enc.192x192_down.skip.weight"].shape) == (256, 256, 1, 1)
    assert tuple(state["model.enc.192x192_down.conv0.resample_filter"].shape) == (1, 1, 2, 2)
    assert tuple(state["model.map_layer0.weight"].shape) == (512, 128)
    assert tuple(state["model.dec.384x384_block0.conv0.weight"].shape) == (256, 512, 3, 3)
    assert tuple(state["model.dec.384x384_aux_conv.weight"].shape) == (1, 256, 3, 3)
    # attention only in the first decoder block of the coarsest level (R/4 = 96; [16] matches no level)
    assert [k for k in state if "qkv" in k] == ["model.dec.96x96_in0.qkv.weight", "model.dec.96x96_in0.qkv.bias"]
    assert tuple(state["model.dec.96x96_in0.qkv.weight"].shape) == (768, 256, 1, 1)
    assert list(state)[:2] == ["model.map_layer0.weight", "model.map_layer0.bias"]
    assert list(state)[-1] == "model.dec.384x384_aux_conv.bias"


def test_fir_resampling_with_box_filter_is_average_pool_and_nearest_upsampling():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    down = EDMConv2d(2, 2, kernel=0, down=True, resample_filter=[1, 1])
    up = EDMConv2d(2, 2, kernel=0, up=True, resample_filter=[1, 1])
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    assert down(x)[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4)
    torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_block_skip_is_scaled_by_sqrt_half_and_attention_adds_its_projection():
    torch.manual_seed(0)
    block = SongUNetBlock(16, 16, emb_channels=8, attention=True)
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.proj.weight.zero_()  # conv1 = 0 and proj = 0: both residual branches vanish
    torch.testing.assert_close(block(x, emb), x * 0.5)  # (x / sqrt 2) / sqrt 2
    with torch.no_grad():
        block.proj.weight.copy_(torch.eye(16)[:, :, None, None])
        block.qkv.weight.zero_()
        block.qkv.bias.zero_()
        block.qkv.bias[2::3] = 1.0  # q = k = 0 (uniform attention), v = 1 everywhere
    # attention of a constant value map returns 1 everywhere: out = (proj(1) + x/sqrt2)/sqrt2
    torch.testing.assert_close(block(x, emb), (1.0 + x * math.sqrt(0.5)) * math.sqrt(0.5))


def test_positional_embedding_is_sin_then_cos_with_endpoint_frequencies():
    emb = PositionalEmbedding(8)(torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(emb[0], torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1]))
    w = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])  # w_k = 10000^(-k/3), last = 1/10000
    torch.testing.assert_close(emb[1], torch.cat([(2 * w).sin(), (2 * w).cos()]))


def test_small_forward_shapes_and_edm_preconditioning_formula():
    torch.manual_seed(0)
    net = song_unet_from_kwargs(**TINY_KWARGS).eval()
    with torch.no_grad():  # make the near-zero output layers matter
        for p in net.parameters():
            p.normal_(0, 0.2)
    assert "enc.32x32_conv.weight" in net.state_dict() and "dec.16x16_in0.qkv.weight" in net.state_dict()
    x, pos = torch.randn(2, 1, 16, 16), torch.rand(2, 2, 16, 16) * 2 - 1
    sigma = torch.tensor([0.2, 5.0])
    precond = SongUNetPrecond(net)
    with torch.no_grad():
        out = precond(x, sigma, pos=pos)
        s = sigma.reshape(-1, 1, 1, 1)
        raw = net(x / (s**2 + 0.25).sqrt(), sigma.log() / 4, pos=pos)
        by_hand = 0.25 / (s**2 + 0.25) * x + s * 0.5 / (s**2 + 0.25).sqrt() * raw
        project = EDMPrecond(net, 0.5)(x, sigma, pos=pos)
    assert out.shape == (2, 1, 16, 16) and raw.shape == (2, 1, 16, 16)
    assert raw.abs().mean() > 0.1  # the network output is not negligible, so the comparison tests the mixing
    torch.testing.assert_close(out, by_hand)
    torch.testing.assert_close(out, project)
    with torch.no_grad():  # positions are input: moving them changes the output
        assert (precond(x, sigma, pos=-pos) - out).abs().max() > 1e-3


def test_bad_configurations_raise_clear_errors():
    net = song_unet_from_kwargs(**TINY_KWARGS)
    with pytest.raises(UserError, match=r"\(B, 3, H, W\).*pass pos="):
        net(torch.zeros(1, 1, 16, 16), torch.zeros(1))
    with pytest.raises(UserError, match="divisible by 2"):
        net(torch.zeros(1, 1, 15, 15), torch.zeros(1), pos=torch.zeros(1, 2, 15, 15))
    with pytest.raises(UserError, match=r"unknown SongUNet argument\(s\) \['implicit_mlp'\]"):
        song_unet_from_kwargs(**TINY_KWARGS, implicit_mlp=True)
    with pytest.raises(UserError, match="class-conditional"):
        song_unet_from_kwargs(**{**TINY_KWARGS, "label_dim": 10})
    with pytest.raises(UserError, match="encoder_type must be one of"):
        song_unet_from_kwargs(**{**TINY_KWARGS, "encoder_type": "dense"})
    with pytest.raises(UserError, match="GroupNorm over 18 channels"):
        song_unet_from_kwargs(**{**TINY_KWARGS, "model_channels": 18})
    with pytest.raises(UserError, match="img_resolution 30 must be divisible"):
        song_unet_from_kwargs(**{**TINY_KWARGS, "img_resolution": 30, "channel_mult": [1, 2, 2]})
