"""Wall time per image of ReSample with batched inner optimisations (one batch of B images) against one image at a
time, at equal settings, on a tiny latent prior with a moderately sized convolutional decoder.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/latent/bench_resample_batched.py            # CPU
    .venv/bin/python experiments/latent/bench_resample_batched.py --device cuda --size 64      # GPU

The latent prior is N(0, I) on (C, H/4, W/4) latents (exact denoiser z / (1 + sigma^2)); the decoder is a randomly
initialised (seeded) conv net up-sampling x4 to (3, H, W), the encoder its mirror; the operator is a circular Gaussian
blur in pixel space. The batched run must reproduce the one-at-a-time samples (checked; the maximum difference is
printed). Prints a markdown table: seconds per image for both and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn

from diffinv_pl.operators import build_operator
from diffinv_pl.priors.base import Prior
from diffinv_pl.solvers import InverseProblem
from diffinv_pl.solvers.resample import resample


class ConvLatentPrior(Prior):
    """Standard-normal latent (C, s/4, s/4) with a conv decoder (x4 up-sampling, ``width`` channels) and encoder."""

    def __init__(self, size: int, latent_channels: int = 3, width: int = 64, seed: int = 0) -> None:
        torch.manual_seed(seed)  # network initialisation only; the solver draws from its own generators
        c, w = latent_channels, width
        self.decoder = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, 3, 3, padding=1),
        )
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(w, c, 3, padding=1),
        )
        for p in [*self.decoder.parameters(), *self.encoder.parameters()]:
            p.requires_grad_(False)
        self.size, self.latent_channels = size, c

    def to(self, device: str, dtype: torch.dtype) -> ConvLatentPrior:
        self.decoder.to(device, dtype)
        self.encoder.to(device, dtype)
        return self

    def denoise(self, x: Tensor, sigma: Tensor | float, *, generator=None, network_sigma=None) -> Tensor:
        return x / (1 + torch.as_tensor(sigma, dtype=x.dtype, device=x.device) ** 2)

    def state_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.latent_channels, data_shape[-2] // 4, data_shape[-1] // 4)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z.reshape(-1, *z.shape[-3:])).reshape(*z.shape[:-3], 3, self.size, self.size)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x.reshape(-1, *x.shape[-3:])).reshape(*x.shape[:-3], *self.state_shape(tuple(x.shape[-3:])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image side (multiple of 4)")
    parser.add_argument("--width", type=int, default=64, help="decoder/encoder channels")
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--dc-period", type=int, default=5)
    parser.add_argument("--pixel-iters", type=int, default=100)
    parser.add_argument("--latent-iters", type=int, default=50)
    args = parser.parse_args()
    dtype = torch.float32
    prior = ConvLatentPrior(args.size, width=args.width).to(args.device, dtype)
    op = build_operator("gaussian_blur_circular", kernel_size=5, std=1.0, channels=3, image_size=args.size,
                        input_range=(0.0, 1.0)).to(args.device)
    g = torch.Generator().manual_seed(0)
    truth = prior.decode(torch.randn(args.batch, *prior.state_shape((3, args.size, args.size)), generator=g).to(args.device, dtype))
    y = (op(truth) + 0.01 * torch.randn(truth.shape, generator=g).to(args.device, dtype)).detach()
    hyper = dict(num_steps=args.num_steps, dc_period=args.dc_period, pixel_max_iters=args.pixel_iters,
                 latent_max_iters=args.latent_iters, divergence_window=None)

    def run(rows: list[int]) -> Tensor:
        gens = [torch.Generator().manual_seed(100 + r) for r in rows]
        return resample(InverseProblem(y[rows], op, 0.01), prior, generator=gens, **hyper).samples

    run([0])  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    batched = run(list(range(args.batch)))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_batch = (time.perf_counter() - start) / args.batch
    start = time.perf_counter()
    single = torch.cat([run([r]) for r in range(args.batch)])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_single = (time.perf_counter() - start) / args.batch
    diff = float((batched - single).abs().max())
    torch.testing.assert_close(batched, single, rtol=1e-3, atol=1e-3)
    print(f"device {args.device}, {args.batch} images {args.size}x{args.size}, decoder width {args.width}, "
          f"{args.num_steps} steps, events every {args.dc_period}, pixel/latent iterations {args.pixel_iters}/"
          f"{args.latent_iters}; max |batched - single| = {diff:.2e}")
    print("| mode | s / image |\n|---|---|")
    print(f"| one at a time | {t_single:.3f} |\n| batched ({args.batch}) | {t_batch:.3f} |")
    print(f"| ratio (one at a time / batched) | {t_single / t_batch:.2f} |")


if __name__ == "__main__":
    main()
