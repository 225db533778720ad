"""Encode an image folder once with a frozen autoencoder, for latent diffusion training without on-the-fly encoding.

    python data_prep/encode_latents.py --autoencoder DIR --images DIR --out DIR [--image-size S] [--mode RGB|L]
        [--batch-size B] [--per-file N] [--device cpu|cuda] [--overwrite]

``--autoencoder``: a diffusers autoencoder folder or an AutoencoderTask checkpoint (``load_autoencoder``). Images are
read with ``ImageFolderDataset`` (sorted, key = relative path; ``--image-size`` resizes the shorter side and
centre-crops, ``--mode L`` makes one channel), in [0, 1], and encoded to the *unscaled* latent E(x) (VQ:
pre-quantisation; KL: posterior mean). Written to ``--out``: ``latents_NNNNN.pt`` ({"keys", "latent": float32
(N, c, h, w)}, ``--per-file`` latents each) and ``latents.json`` (format, autoencoder path and ``describe()``, image
shape, latent shape, count, files). Train on them with ``python train.py experiment=ldm_latents_tiny data.root=DIR``
(data module :class:`diffinv_pl.latent_pipeline.LatentDataModule`); the task checks that its own autoencoder is the
one that encoded them.

User mistakes (missing autoencoder or images, images the autoencoder cannot take, existing output without
``--overwrite``) print one ``error: ...`` line naming the fix and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from diffinv_pl.data.images import ImageFolderDataset
from diffinv_pl.errors import UserError, report_user_errors
from diffinv_pl.latent_pipeline import LATENT_FORMAT, LATENT_INDEX
from diffinv_pl.priors.autoencoders import load_autoencoder


def encode_folder(
    autoencoder: str | Path,
    images: str | Path,
    out: str | Path,
    image_size: int | None = None,
    mode: str = "RGB",
    batch_size: int = 16,
    per_file: int = 4096,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Encode every image under ``images`` into ``out`` (module docstring); returns the written index."""
    out = Path(out)
    if (out / LATENT_INDEX).exists() and not overwrite:
        raise UserError(f"{out} already holds encoded latents: choose another --out or pass --overwrite")
    if batch_size < 1 or per_file < 1:
        raise UserError(f"--batch-size and --per-file must be >= 1, got {batch_size}, {per_file}")
    ae = load_autoencoder(autoencoder, device=device)
    dataset = ImageFolderDataset(images, image_size=image_size, mode=mode)
    if len(dataset) == 0:
        raise UserError(f"no images under {images}: give a folder of PNG/JPEG files")
    keys: list[str] = []
    chunks: list[torch.Tensor] = []
    image_shape = None
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size):
            x = batch["image"].to(device)
            if image_shape is None:
                image_shape = list(x.shape[1:])
                ae.latent_shape(tuple(image_shape))  # channels / divisibility: UserError naming the fix
            elif list(x.shape[1:]) != image_shape:
                raise UserError(f"images of different sizes ({image_shape} and {list(x.shape[1:])}): pass --image-size")
            chunks.append(ae.encode(x).float().cpu())
            keys.extend(batch["key"])
    latents = torch.cat(chunks)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, start in enumerate(range(0, len(latents), per_file)):
        name = f"latents_{i:05d}.pt"
        torch.save({"keys": keys[start : start + per_file], "latent": latents[start : start + per_file].clone()},
                   out / name)
        files.append(name)
    index = {
        "format": LATENT_FORMAT,
        "autoencoder": str(autoencoder),
        "autoencoder_description": ae.describe(),
        "image_shape": image_shape,
        "latent_shape": list(latents.shape[1:]),
        "count": len(latents),
        "files": files,
    }
    (out / LATENT_INDEX).write_text(json.dumps(index, indent=1))
    return index


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--autoencoder", required=True, help="diffusers folder or AutoencoderTask .ckpt")
    parser.add_argument("--images", required=True, help="folder of PNG/JPEG images")
    parser.add_argument("--out", required=True, help="output folder (latents.json + latents_NNNNN.pt)")
    parser.add_argument("--image-size", type=int, default=None, help="resize shorter side + centre crop")
    parser.add_argument("--mode", default="RGB", choices=["RGB", "L"], help="RGB: 3 channels, L: 1 channel")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-file", type=int, default=4096, help="latents per .pt file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    index = encode_folder(args.autoencoder, args.images, args.out, args.image_size, args.mode, args.batch_size,
                          args.per_file, args.device, args.overwrite)
    print(f"encoded {index['count']} images {index['image_shape']} -> latents {index['latent_shape']} in {args.out}")


if __name__ == "__main__":
    sys.exit(main())
