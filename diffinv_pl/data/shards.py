"""webdataset shards with a random-access index, for exact (every sample once) evaluation (conventions.md §6 (a)).

Layout written by :func:`write_shards` into ``out_dir``:

* ``shard-000000.tar``, ``shard-000001.tar``, ...: plain webdataset shards written by ``webdataset.ShardWriter``
  (USTAR, fixed mtime, so the same data gives byte-identical shards). Sample ``key`` is the members ``{key}.png``
  (8-bit L or RGB, lossless for 8-bit sources) or ``{key}.npy`` (float32 (C, H, W), exact for float data such as CT
  phantoms) and ``{key}.json`` (the key, the image shape and the sample's other JSON-serialisable fields). They stream
  with ``wds.WebDataset(ShardIndexDataset(out_dir).urls, shardshuffle=False)`` as usual.
* ``index.json``: ``{"format": "diffinv-shard-index-v1", "image_format", "num_samples", "shards": {shard name:
  [keys in tar order]}, "members": {shard name: [[image offset, image size, json offset, json size], ...]}}``.
  The offsets are the byte positions of each member's data inside its tar (``tarfile.TarInfo.offset_data``, read back
  from the finished shard), so :class:`ShardIndexDataset` reads sample i with one seek + read of an uncompressed tar:
  map-style random access without scanning (the ``wids`` package does the same but is not installed here).

Keys must be unique and representable by webdataset, which splits a member name at the first dot of its last path
component: a key may contain "/" but no "." after its last "/".

Values: images are finite and in [0, 1] (PNG members decode to value / 255; npy members are used as stored).
:func:`write_shards` refuses a sample with NaN/Inf or out-of-range values, and reading a member that has them
(:func:`decode_image`) raises a :class:`~diffinv_pl.errors.UserError` naming the sample key, the shard and the fix.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffinv_pl.data.images import check_image_values
from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.utils.io import atomic_write_text

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "diffinv-shard-index-v1"
SHARD_PATTERN = "shard-%06d.tar"
IMAGE_FORMATS = ("png", "npy")
REWRITE_HINT = "rewrite the shards from clean data with data_prep/make_shards.py --overwrite"


def write_shards(
    dataset,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    image_format: str = "png",  # "png": 8-bit, lossless for 8-bit sources; "npy": float32, exact for any data
    overwrite: bool = False,  # delete the index.json and shard-*.tar already in out_dir first
) -> Path:
    """Write every sample of ``dataset`` (dicts with "key" and "image") to shards plus ``index.json``; returns the
    index path. Keys are checked for uniqueness before anything is written when the dataset has a ``keys`` list, and
    while writing otherwise (the partial shards are then removed)."""
    from webdataset import ShardWriter

    if samples_per_shard < 1:
        raise UserError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if image_format not in IMAGE_FORMATS:
        raise UserError(f"unknown image_format {image_format!r}; valid: {', '.join(IMAGE_FORMATS)}")
    if len(dataset) == 0:
        raise UserError("the dataset is empty: nothing to write; check the input folder")
    out = Path(out_dir)
    index_path = out / INDEX_NAME
    if hasattr(dataset, "keys") and not callable(dataset.keys):
        _check_keys(list(dataset.keys))
    existing = ([index_path] if index_path.exists() else []) + sorted(out.glob("shard-*.tar"))
    if existing and not overwrite:
        raise FileExistsError(f"{str(out)!r} already holds shards or an index; pass overwrite=True to replace them")
    for p in existing:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    shards: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    quant_err = 0.0
    writer = ShardWriter(str(out / SHARD_PATTERN), maxcount=samples_per_shard, maxsize=float("inf"), verbose=0, mtime=0)
    try:
        for i, sample in enumerate(dataset):
            key = sample["key"]
            _check_key(key)
            if key in seen:
                raise UserError(
                    f"duplicate sample key {key!r} (samples {seen[key]} and {i}); give every sample its own key"
                )
            seen[key] = i
            image = sample["image"].detach().cpu()
            where = _sample_where(dataset, sample, key)
            if image.ndim != 3:
                raise UserError(f"{where}: image must be (C, H, W), got shape {tuple(image.shape)}")
            check_image_values(image, where, "fix or remove that input and write the shards again")
            meta = {"key": key, "shape": list(image.shape)}
            meta.update({k: v for k, v in sample.items() if k not in ("key", "image") and _jsonable(v)})
            record = {"__key__": key, "json": meta}
            if image_format == "png":
                record["png"], err = _png_array(key, image)
                quant_err = max(quant_err, err)
            else:
                record["npy"] = image.to(torch.float32).numpy()
            writer.write(record)
            shards.setdefault(Path(writer.fname).name, []).append(key)
    except BaseException:
        opened = writer.shard  # ShardWriter counts the shards it opened in .shard (deleted by close())
        writer.close()
        for j in range(opened):
            (out / (SHARD_PATTERN % j)).unlink(missing_ok=True)
        raise
    writer.close()
    if quant_err > 1e-6:
        log.warning(
            "image_format='png' quantised the images to 8 bits (max error %.3g); use 'npy' to store floats exactly",
            quant_err,
        )

    members = {name: _member_offsets(out / name, keys, image_format) for name, keys in shards.items()}
    index = {
        "format": INDEX_FORMAT,
        "image_format": image_format,
        "num_samples": len(seen),
        "shards": shards,
        "members": members,
    }
    atomic_write_text(index_path, json.dumps(index))
    return index_path


def _sample_where(dataset, sample: dict, key: str) -> str:
    """``sample 'key'``, plus the file it came from when the sample has a "path" (relative to ``dataset.root``)."""
    path = sample.get("path")
    if not isinstance(path, (str, Path)):
        return f"sample {key!r}"
    root = getattr(dataset, "root", None)
    return f"sample {key!r} (file {str(Path(root) / path if root is not None else path)!r})"


def member_where(key: str, image_format: str, shard: str | Path) -> str:
    """How errors name a shard member: the sample key, the member and the shard file."""
    return f"sample {key!r} (member {key}.{image_format} of shard {str(shard)!r})"


class ShardIndexDataset(Dataset):
    """Map-style view of shards written by :func:`write_shards`: sample i is ``{"key", "image" (C, H, W) float32,
    "meta"}``, read by seeking to its offsets in the index (no scan), so any subset of indices can be read exactly."""

    def __init__(self, out_dir: str | Path):
        path = Path(out_dir)
        index_path = path / INDEX_NAME if path.is_dir() or not path.suffix else path
        self.root = index_path.parent
        if not index_path.is_file():
            raise UserFileError(
                f"no shard index {str(index_path)!r}; point the path at a folder written by data_prep/make_shards.py "
                "(it holds index.json and shard-*.tar)"
            )
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"shard index {str(index_path)!r} is not valid JSON ({err}); {REWRITE_HINT}") from err
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            fmt = index.get("format") if isinstance(index, dict) else None
            raise UserError(f"{str(index_path)!r} is not a {INDEX_FORMAT} index (format={fmt!r}); {REWRITE_HINT}")
        self.image_format: str = index["image_format"]
        missing = [name for name in index["shards"] if not (self.root / name).is_file()]
        if missing:
            raise UserFileError(
                f"shard(s) listed in {str(index_path)!r} are missing: {missing[:10]}; copy them next to the index "
                f"or {REWRITE_HINT}"
            )
        self.keys: list[str] = []
        self._where: list[tuple[str, list[int]]] = []
        for name, keys in index["shards"].items():
            offsets = index["members"][name]
            if len(offsets) != len(keys):
                raise UserError(
                    f"{str(index_path)!r}: shard {name} lists {len(keys)} keys but {len(offsets)} offsets; "
                    f"{REWRITE_HINT}"
                )
            end = max((max(o[0] + o[1], o[2] + o[3]) for o in offsets), default=0)
            if (self.root / name).stat().st_size < end:
                raise UserError(
                    f"shard {str(self.root / name)!r} is shorter than its index says (truncated copy?); copy it "
                    f"again or {REWRITE_HINT}"
                )
            self.keys += keys
            self._where += [(name, o) for o in offsets]
        dup = sorted(k for k, n in Counter(self.keys).items() if n > 1)
        if dup:
            raise UserError(f"{str(index_path)!r} lists duplicate keys: {dup[:10]}; {REWRITE_HINT}")
        if len(self.keys) != index["num_samples"]:
            raise UserError(
                f"{str(index_path)!r}: num_samples={index['num_samples']} but the shards list {len(self.keys)} keys; "
                f"{REWRITE_HINT}"
            )
        self._position = {k: i for i, k in enumerate(self.keys)}

    @property
    def urls(self) -> list[str]:
        """The shard paths, in index order (for streaming with ``webdataset.WebDataset``)."""
        return [str(self.root / name) for name in dict.fromkeys(name for name, _ in self._where)]

    def index_of(self, key: str) -> int:
        return self._position[key]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.keys):
            raise IndexError(f"index {index} out of range for {len(self.keys)} samples")
        name, (img_off, img_size, json_off, json_size) = self._where[index]
        with open(self.root / name, "rb") as f:
            f.seek(img_off)
            data = f.read(img_size)
            f.seek(json_off)
            meta = json.loads(f.read(json_size))
        where = member_where(self.keys[index], self.image_format, self.root / name)
        image = decode_image(data, self.image_format, where)
        return {"key": self.keys[index], "image": image, "meta": meta}


def decode_image(data: bytes, image_format: str, where: str) -> torch.Tensor:
    """A shard member as a (C, H, W) tensor in [0, 1]: 8-bit L / RGB PNG -> float32 value / 255, npy as stored.
    ``where`` names the sample in errors (:func:`member_where`); a member that does not decode, or an npy member
    with NaN/Inf or values outside [0, 1], raises a :class:`UserError`."""
    if image_format == "png":
        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im)
        except Exception as err:  # noqa: BLE001 (any decoder failure means a corrupt member)
            raise UserError(f"{where}: PNG does not decode ({type(err).__name__}: {err}); {REWRITE_HINT}") from err
        if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
            raise UserError(
                f"{where}: PNG must be 8-bit L or RGB, got dtype {arr.dtype} shape {arr.shape}; {REWRITE_HINT}"
            )
        image = torch.from_numpy(arr.copy()).to(torch.float32) / 255.0
        return image[None] if image.ndim == 2 else image.permute(2, 0, 1).contiguous()
    if image_format == "npy":
        try:
            image = torch.from_numpy(np.lib.format.read_array(io.BytesIO(data), allow_pickle=False))
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{where}: npy does not decode ({type(err).__name__}: {err}); {REWRITE_HINT}") from err
        check_image_values(image, where, REWRITE_HINT)
        return image
    raise UserError(f"unknown image_format {image_format!r}; valid: {', '.join(IMAGE_FORMATS)}")


def validate_shards(out_dir: str | Path) -> dict[str, int]:
    """Check shards written by :func:`write_shards` end to end and return the sample count of every shard.

    Checks: the index (format, listed shards present and long enough, unique keys, counts: see
    :class:`ShardIndexDataset`); streamed in tar order with webdataset, every shard holds exactly the keys the index
    lists, each with its image and JSON member; every image decodes to the shape its JSON records, finite and in
    [0, 1]. Raises a :class:`UserError` naming every problem found (at most 20).
    """
    from webdataset import tarfile_samples

    dataset = ShardIndexDataset(out_dir)
    problems: list[str] = []
    counts: dict[str, int] = {}
    for url in dataset.urls:
        name = Path(url).name
        streamed = [sample["__key__"] for sample in tarfile_samples([{"url": url}])]
        expected = [k for k, (shard, _) in zip(dataset.keys, dataset._where) if shard == name]
        if streamed != expected:
            problems.append(f"{name}: streamed keys differ from the index ({len(streamed)} vs {len(expected)} keys)")
        counts[name] = len(streamed)
    for i, key in enumerate(dataset.keys):
        try:
            sample = dataset[i]
        except (ValueError, json.JSONDecodeError) as err:  # UserError is a ValueError; the fix is said once below
            problems.append(str(err).replace(f"; {REWRITE_HINT}", ""))
            continue
        image, shape = sample["image"], sample["meta"].get("shape")
        if shape is not None and list(image.shape) != list(shape):
            problems.append(f"sample {key!r}: image shape {list(image.shape)} but its JSON records {shape}")
    if problems:
        more = f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""
        raise UserError(
            f"shards in {str(dataset.root)!r} are invalid: " + "; ".join(problems[:20]) + more + f"; {REWRITE_HINT}"
        )
    return counts


def _png_array(key: str, image: torch.Tensor) -> tuple[np.ndarray, float]:
    """(H, W) or (H, W, 3) uint8 for webdataset's PNG encoder (which would truncate floats, not round them)."""
    if image.shape[0] not in (1, 3):
        raise UserError(f"sample {key!r}: PNG needs 1 or 3 channels, got {image.shape[0]}; use image_format='npy'")
    q = (image.to(torch.float32) * 255.0).round()
    err = float((q / 255.0 - image).abs().max())
    arr = q.to(torch.uint8).permute(1, 2, 0).numpy()
    return (arr[..., 0] if arr.shape[2] == 1 else arr), err


def _member_offsets(shard: Path, keys: list[str], image_format: str) -> list[list[int]]:
    """[image offset, image size, json offset, json size] per key, read back from the finished tar."""
    from webdataset.tariterators import base_plus_ext  # webdataset's own member-name -> (key, field) split

    found: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(shard, "r:") as tar:
        for m in tar.getmembers():
            key, ext = base_plus_ext(m.name) if m.isfile() else (None, None)
            if key is None:
                continue
            found.setdefault(key, {})[ext] = (m.offset_data, m.size)
    if list(found) != keys:
        raise RuntimeError(f"shard {str(shard)!r} does not hold the keys written to it")
    return [[*found[k][image_format], *found[k]["json"]] for k in keys]


def _check_key(key) -> None:
    if not isinstance(key, str) or not key:
        raise UserError(f"sample keys must be non-empty strings, got {key!r}")
    if "." in key.rsplit("/", 1)[-1] or key.startswith("/") or key.startswith("_"):
        raise UserError(
            f"sample key {key!r} cannot be a webdataset key (no '.' after the last '/', no leading '/' or '_'); "
            "rename the file"
        )


def _check_keys(keys: list[str]) -> None:
    for k in keys:
        _check_key(k)
    dup = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dup:
        raise UserError(f"duplicate sample keys: {dup[:10]}; give every sample its own key")


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
