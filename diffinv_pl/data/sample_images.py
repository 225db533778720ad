"""A small offline evaluation set: the photographs bundled with scikit-image (``skimage.data``), nothing to download.

Each image is converted to ``mode`` ("RGB" or "L", ITU-R 601-2 luma), its shorter side resized to ``image_size``
(bicubic, antialiased: PIL's filters widen with the scale factor) and centre-cropped to ``image_size`` x
``image_size``, as :class:`~diffinv_pl.data.images.ImageFolderDataset` does, and returned as
``{"key": <name>, "image": (C, H, W) float32 in [0, 1] (uint8 / 255), "path": "skimage.data.<name>"}``: the same
keys and range as the image-folder and CT-phantom datasets. Keys are the image names, so the per-sample operator and
noise generators (seeded by the key) do not depend on which other images are selected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffinv_pl.errors import UserError

# colour photographs bundled with scikit-image (no download): the default order
SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel")
MODES = ("RGB", "L")


class SampleImageDataset(Dataset):
    """scikit-image's bundled photographs as an evaluation dataset (module docstring).

    Args:
        names: which images, in order (default :data:`SAMPLE_IMAGES`).
        num_images: keep the first ``num_images`` of ``names`` (None: all).
        image_size: side of the square output images.
        mode: "RGB" (3 channels) or "L" (1 channel).
    """

    def __init__(
        self,
        names: Sequence[str] | None = None,
        num_images: int | None = None,
        image_size: int = 32,
        mode: str = "RGB",
    ) -> None:
        names = list(names) if names is not None else list(SAMPLE_IMAGES)
        unknown = [n for n in names if n not in SAMPLE_IMAGES]
        if unknown:
            raise UserError(f"unknown sample image(s) {unknown}; valid: {', '.join(SAMPLE_IMAGES)} (set data.names)")
        if len(set(names)) != len(names):
            raise UserError(f"data.names lists an image more than once: {names}; list each image once")
        if mode not in MODES:
            raise UserError(f"unknown image mode {mode!r}; valid: {', '.join(MODES)} (set data.mode)")
        if not (isinstance(image_size, int) and image_size >= 1):
            raise UserError(f"image_size must be an int >= 1, got {image_size!r} (set data.image_size)")
        if num_images is not None:
            if not (isinstance(num_images, int) and 1 <= num_images):
                raise UserError(f"num_images must be an int >= 1 or null, got {num_images!r} (set data.num_images)")
            if num_images > len(names):
                raise UserError(
                    f"num_images={num_images} but only {len(names)} sample image(s) are available "
                    f"({', '.join(names)}); set data.num_images <= {len(names)}"
                )
            names = names[:num_images]
        if not names:
            raise UserError("data.names is empty; list at least one sample image")
        self.keys: list[str] = names
        self.image_size, self.mode = image_size, mode

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.keys):
            raise IndexError(f"index {index} out of range for {len(self.keys)} images")
        name = self.keys[index]
        image = load_sample_image(name, self.image_size, self.mode)
        return {"key": name, "image": image, "path": f"skimage.data.{name}"}


def load_sample_image(name: str, image_size: int, mode: str = "RGB") -> torch.Tensor:
    """Bundled image ``name`` as a (C, image_size, image_size) float32 tensor in [0, 1] (module docstring)."""
    import skimage.data
    from torchvision.transforms import functional as TF

    if name not in SAMPLE_IMAGES:
        raise UserError(f"unknown sample image {name!r}; valid: {', '.join(SAMPLE_IMAGES)}")
    img = Image.fromarray(np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)).convert(mode)
    img = TF.resize(img, image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    img = TF.center_crop(img, [image_size, image_size])
    x = torch.from_numpy(np.asarray(img).copy()).to(torch.float32) / 255.0
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()
