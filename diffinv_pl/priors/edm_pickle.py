"""Official PaDIS / EDM ``network-snapshot-*.pkl`` files, read without ever executing pickled code.

PaDIS (jasonhu4/PaDIS, on NVlabs/edm) saves ``pickle.dump(dict(ema, loss_fn, augment_pipe, dataset_kwargs))``. The
networks are EDM ``torch_utils.persistence`` objects: each pickles as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = dict(type, version, module_src,
class_name, state)``, and the real reconstructor ``exec``-s ``module_src`` (arbitrary code). Tensors pickle as
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` (``_rebuild_parameter`` around it for
parameters), each storage as ``torch.storage._load_from_bytes(bytes)`` (a small legacy-format ``torch.save`` of that
storage); plain submodules such as ``torch.nn.ModuleDict`` pickle as NEWOBJ of their class plus their ``__dict__``.

:class:`RestrictedSnapshotUnpickler` resolves only an allow-list of globals:

* tensor rebuilds (``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``) and storages, the latter re-read
  with ``torch.load(weights_only=True)`` instead of ``_load_from_bytes``;
* ``collections.OrderedDict``, torch dtypes, numpy scalars and dtypes;
* a stub for the persistence reconstructor that returns a :class:`PersistentRecord` of the ``meta`` dict (the source
  is kept as text and never run), and record types for torch containers (``ModuleDict``, ``Sequential``, ...) and
  ``dnnlib.util.EasyDict``, which only store their state.

Any other global is refused with a :class:`UserError` naming it. From the ``ema`` record, :func:`read_padis_snapshot`
recovers the full state dict (walking ``_parameters`` / ``_buffers`` / ``_modules`` as ``nn.Module.state_dict``
does) and the init kwargs; the canvas side R is read from the key names (``model.enc.{R}x{R}_conv.weight``), and the
training pad is M = (R - N) / 2 for image size N (PaDIS: R = 384, N = 256 => M = 64).

:func:`convert_padis_snapshot` writes the network once as ``model.safetensors`` (EDM's parameter names, ``model.*``)
plus ``description.json`` (:data:`CONVERTED_FORMAT`, the source kwargs and a :class:`PriorCheckpointDescription`);
:func:`load_converted_padis` / :func:`converted_padis_prior` read that form back (no pickle involved). CLI:

    python -m diffinv_pl.priors.edm_pickle convert network-snapshot-XXXXXX.pkl OUT_DIR --image-size 256
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffinv_pl.errors import UserError, UserFileError, report_user_errors
from diffinv_pl.utils.io import file_sha256
from diffinv_pl.priors.base import Prior
from diffinv_pl.priors.checkpoints import EDM_SIGMA_RANGE, DiffusionPrior, PriorCheckpointDescription
from diffinv_pl.priors.network import RangeAdaptedPrior
from diffinv_pl.priors.patches import PositionalConvention
from diffinv_pl.priors.song_unet import SONG_UNET_KWARGS, SongUNetPrecond, song_unet_from_kwargs

CONVERTED_FORMAT = "diffinv_pl.edm_snapshot/1"
WEIGHTS_FILE = "model.safetensors"
DESCRIPTION_FILE = "description.json"
PATCH_PRECOND = "Patch_EDMPrecond"
# Patch_EDMPrecond's own init arguments; every other kwarg goes to the SongUNet
PRECOND_KWARGS = ("img_resolution", "img_channels", "out_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                  "sigma_data", "model_type", "four_channels", "hash_channels")
POSITIONAL_CHANNELS = 2
# PaDIS's Patch_EDMLoss defaults (P_mean, P_std, sigma_data), methods.md §3.2
PADIS_LOSS_DEFAULTS = {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}
PERSISTENCE_RECONSTRUCTOR = ("torch_utils.persistence", "_reconstruct_persistent_obj")


@dataclass
class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` would have rebuilt, as data: the class name, the module source
    (text, never executed), the version and the instance state (``__dict__``: ``_parameters``, ``_buffers``,
    ``_modules``, ``_init_args``, ``_init_kwargs``, ...)."""

    class_name: str
    module_src: str
    version: Any
    state: dict

    @property
    def init_kwargs(self) -> dict:
        kwargs = self.state.get("_init_kwargs")
        return dict(kwargs) if isinstance(kwargs, Mapping) else {}


class _StateRecord:
    """Base of the record types for plain torch containers: NEWOBJ creates one, BUILD stores its ``__dict__``."""

    qualified_name = "?"

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {"_state": state}


class _EasyDictRecord(dict):
    """``dnnlib.util.EasyDict`` read as a plain dict (its attribute access is not needed)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, Mapping):
            self.update(state)


# plain (non-persistent) torch classes that occur inside EDM / PaDIS networks, read as records of their state
_RECORDED_TORCH_CLASSES = {
    ("torch.nn.modules.container", name) for name in ("ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList")
} | {("torch.nn.modules.activation", name) for name in ("SiLU", "ReLU", "GELU")}
_RECORD_TYPES: dict[tuple[str, str], type] = {
    key: type(key[1], (_StateRecord,), {"qualified_name": ".".join(key)}) for key in _RECORDED_TORCH_CLASSES
}


def _load_storage_from_bytes(data: bytes) -> Any:
    """Replacement for ``torch.storage._load_from_bytes``: the same bytes, read with torch's weights-only unpickler."""
    if not isinstance(data, (bytes, bytearray)):
        raise UserError(f"a pickled tensor storage must be bytes, got {type(data).__name__}: the file is corrupt")
    return torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")


def _reconstruct_record(meta: Any) -> PersistentRecord:
    """Stand-in for EDM's ``_reconstruct_persistent_obj``: records ``meta``; ``module_src`` is never executed."""
    if not isinstance(meta, Mapping) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise UserError(f"malformed EDM persistence record (expected a dict with type 'class' and a class_name), got "
                        f"{type(meta).__name__}: the file is not an EDM network snapshot or is corrupt")
    state = meta.get("state")
    return PersistentRecord(meta["class_name"], str(meta.get("module_src", "")), meta.get("version"),
                            dict(state) if isinstance(state, Mapping) else {})


def _numpy_scalar_fn() -> Any:
    try:
        return np._core.multiarray.scalar  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        return np.core.multiarray.scalar


_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class RestrictedSnapshotUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals listed in the module docstring; every other one raises
    :class:`UserError` naming it, so no code from the file can run."""

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key == PERSISTENCE_RECONSTRUCTOR:
            return _reconstruct_record
        if key == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if key == ("torch._utils", "_rebuild_parameter"):
            return torch._utils._rebuild_parameter
        if key == ("torch.storage", "_load_from_bytes"):
            return _load_storage_from_bytes
        if key == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if key in _RECORD_TYPES:
            return _RECORD_TYPES[key]
        if key == ("dnnlib.util", "EasyDict"):
            return _EasyDictRecord
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _numpy_scalar_fn()
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise UserError(
            f"refused to unpickle global {module}.{name}: an EDM/PaDIS network snapshot needs only tensors, containers "
            "and EDM persistence records, and running other pickled code is unsafe; use an official "
            "network-snapshot-*.pkl (or convert a trusted file with `python -m diffinv_pl.priors.edm_pickle convert`)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UserError(
            "this file uses pickle persistent ids (a torch.save checkpoint, not an EDM pickle.dump snapshot): load it "
            "with torch.load(weights_only=True) or the project's checkpoint loaders instead"
        )


def _missing_snapshot(path: Path) -> UserFileError:
    return UserFileError(
        f"no PaDIS network snapshot at {str(path)!r}: download the official network-snapshot-*.pkl of jasonhu4/PaDIS "
        "(see its README) and put it at that path, or pass the path where it is"
    )


def unpickle_snapshot(path: str | Path) -> dict:
    """The top-level dict of an EDM snapshot, with persistence objects as :class:`PersistentRecord` (never executed).
    Missing file: :class:`UserFileError`; refused globals, truncated or corrupt files: :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise _missing_snapshot(path)
    with path.open("rb") as fh:
        try:
            data = RestrictedSnapshotUnpickler(fh).load()
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 (any unpickling failure: the file is truncated or not a pickle)
            raise UserError(
                f"{str(path)!r} is not a readable EDM network snapshot (truncated or corrupt: {type(err).__name__}: "
                f"{str(err)[:200]}); download network-snapshot-*.pkl again"
            ) from err
    if not isinstance(data, Mapping) or not isinstance(data.get("ema"), PersistentRecord):
        got = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise UserError(f"{str(path)!r} is not an EDM network snapshot: expected a dict with an 'ema' network, got {got}")
    return dict(data)


def record_state_dict(record: PersistentRecord | _StateRecord, prefix: str = "") -> dict[str, Tensor]:
    """The ``state_dict()`` the recorded module would have: its parameters, then its persistent buffers, then those of
    its children (in their stored order), with dotted names."""
    state = record.state
    out: dict[str, Tensor] = {}
    non_persistent = set(state.get("_non_persistent_buffers_set", ()) or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, Tensor):
                raise UserError(f"{prefix + name} is a {type(value).__name__}, not a tensor: the snapshot is corrupt")
            out[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, _StateRecord)):
            raise UserError(f"submodule {prefix + name} was not recorded ({type(child).__name__}): the snapshot is corrupt")
        out.update(record_state_dict(child, f"{prefix}{name}."))
    return out


def canvas_side_from_keys(keys: Sequence[str]) -> int:
    """R from the first encoder's name, ``model.enc.{R}x{R}_conv.*`` (the level-0 resolution)."""
    for key in keys:
        match = re.fullmatch(r"model\.enc\.(\d+)x(\d+)_conv\..+", key)
        if match and match.group(1) == match.group(2):
            return int(match.group(1))
    raise UserError("no 'model.enc.{R}x{R}_conv' weights in the snapshot's EMA network: it is not an EDM SongUNet")


@dataclass
class PadisSnapshot:
    """What an official snapshot holds, as data: the EMA network's class, its init kwargs split into the
    preconditioning's and the SongUNet's, its state dict (``model.*``), the canvas side R from the key names and the
    loss parameters (from ``loss_fn`` when recorded)."""

    class_name: str
    precond_kwargs: dict
    song_unet_kwargs: dict
    state_dict: dict[str, Tensor]
    canvas_side: int
    loss_params: dict = field(default_factory=lambda: dict(PADIS_LOSS_DEFAULTS))

    @property
    def image_channels(self) -> int:
        return int(self.song_unet_kwargs["out_channels"])

    def pad_width(self, image_size: int) -> int:
        """M = (R - N) / 2; refused unless a non-negative integer."""
        if (self.canvas_side - image_size) % 2 or self.canvas_side < image_size:
            raise UserError(
                f"the snapshot's canvas side {self.canvas_side} (from its key names) is not image_size + 2*pad for "
                f"image_size {image_size}: pass the image size the network was trained on (PaDIS: 256)"
            )
        return (self.canvas_side - image_size) // 2


def _plain(value: Any) -> Any:
    """Kwargs values as JSON-able Python containers (numpy scalars to Python numbers, tuples to lists)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_padis_snapshot(path: str | Path) -> PadisSnapshot:
    """Read the EMA network of a PaDIS ``network-snapshot-*.pkl`` as data (module docstring); refuses anything that
    is not a ``Patch_EDMPrecond`` around a SongUNet with raw (x, y) positional channels, naming what differs."""
    data = unpickle_snapshot(path)
    ema: PersistentRecord = data["ema"]
    if ema.class_name != PATCH_PRECOND:
        raise UserError(f"the snapshot's 'ema' network is a {ema.class_name!r}, not PaDIS's {PATCH_PRECOND!r}: only "
                        "PaDIS patch networks (precond=pedm) are supported")
    if ema.state.get("_init_args"):
        raise UserError(f"the snapshot's network was built with positional arguments {ema.state['_init_args']!r}; "
                        "expected keyword arguments only (EDM's construct_class_by_name)")
    kwargs = _plain(ema.init_kwargs)
    model_type = kwargs.get("model_type", "DhariwalUNet")
    if model_type != "SongUNet":
        raise UserError(f"the snapshot's network is a {model_type!r}; only SongUNet (arch ddpmpp / ncsnpp) is supported")
    for name in ("four_channels", "hash_channels"):
        if kwargs.get(name, 1) != 1:
            raise UserError(f"the snapshot uses {name}={kwargs[name]!r} (Fourier/hash positional encoding); only raw "
                            "(x, y) positional channels (1, PaDIS's default) are supported")
    if kwargs.get("label_dim", 0):
        raise UserError(f"the snapshot's network is class-conditional (label_dim={kwargs['label_dim']}); only "
                        "unconditional networks are supported")
    if "img_resolution" not in kwargs or "img_channels" not in kwargs:
        raise UserError(f"the snapshot's init kwargs lack img_resolution / img_channels: got {sorted(kwargs)}")
    precond = {k: kwargs[k] for k in PRECOND_KWARGS if k in kwargs}
    song = {k: v for k, v in kwargs.items() if k not in PRECOND_KWARGS}
    song.update(img_resolution=precond["img_resolution"], in_channels=precond["img_channels"],
                out_channels=precond.get("out_channels") or precond["img_channels"])
    unknown = sorted(set(song) - set(SONG_UNET_KWARGS))
    if unknown:
        raise UserError(f"the snapshot's SongUNet uses argument(s) {unknown} this loader does not support (e.g. "
                        "PaDIS's implicit_mlp); valid: " + ", ".join(SONG_UNET_KWARGS))
    state = record_state_dict(ema)
    side = canvas_side_from_keys(list(state))
    if side != precond["img_resolution"]:
        raise UserError(f"the snapshot's key names give a canvas side {side} but its img_resolution is "
                        f"{precond['img_resolution']}: the file is inconsistent")
    loss = dict(PADIS_LOSS_DEFAULTS)
    loss_rec = data.get("loss_fn")
    if isinstance(loss_rec, PersistentRecord):
        loss.update({k: float(v) for k, v in loss_rec.state.items() if k in PADIS_LOSS_DEFAULTS})
    if "sigma_data" in precond and not math.isclose(float(precond["sigma_data"]), loss["sigma_data"]):
        raise UserError(f"the snapshot's network sigma_data {precond['sigma_data']} differs from its loss's "
                        f"{loss['sigma_data']}: the file is inconsistent")
    return PadisSnapshot(ema.class_name, precond, song, state, side, loss)


def _check_expected(snap: PadisSnapshot, pad: int, where: str, expected_pad: int | None,
                    expected_channels: int | None) -> None:
    if snap.song_unet_kwargs["in_channels"] - snap.image_channels != POSITIONAL_CHANNELS:
        raise UserError(
            f"{where}: the network takes {snap.song_unet_kwargs['in_channels']} input channels for "
            f"{snap.image_channels} image channel(s), not image + {POSITIONAL_CHANNELS} positional channels: it is not "
            "a PaDIS patch network"
        )
    if expected_pad is not None and pad != expected_pad:
        raise UserError(
            f"{where} was trained with pad {pad} (canvas {snap.canvas_side} = {snap.canvas_side - 2 * pad} + 2*{pad}) "
            f"but pad {expected_pad} is expected: the network would see shifted positions; use pad_width={pad} "
            "(or a checkpoint trained with the expected pad)"
        )
    if expected_channels is not None and snap.image_channels != expected_channels:
        raise UserError(f"{where} denoises {snap.image_channels} channel(s) but {expected_channels} are expected: use "
                        "a network trained on data with the same channel count")


def build_padis_network(snap: PadisSnapshot) -> SongUNetPrecond:
    """Our SongUNet inside the EDM preconditioning, with the snapshot's weights loaded strictly, in eval mode."""
    model = SongUNetPrecond(song_unet_from_kwargs(**snap.song_unet_kwargs),
                            float(snap.precond_kwargs.get("sigma_data", 0.5)))
    try:
        model.load_state_dict(snap.state_dict, strict=True)
    except RuntimeError as err:
        raise UserError(f"the snapshot's weights do not match the SongUNet its kwargs describe: {str(err)[:600]}") from err
    return model.eval().requires_grad_(False)


def padis_description(snap: PadisSnapshot, image_size: int, inference_patch_size: int = 64,
                      data_range: tuple[float, float] = (0.0, 1.0)) -> PriorCheckpointDescription:
    """The project's description of the network: SongUNet config, EDM objective with the snapshot's loss
    parameters, channels, data = model range (PaDIS trains on [0, 1] images, not rescaled), the training positional
    convention (canvas normalisation, pad from the key names) and EDM's sampling sigma range."""
    pad = snap.pad_width(image_size)
    convention = PositionalConvention(int(image_size), pad, "canvas")
    if inference_patch_size > convention.padded_size:
        raise UserError(f"inference_patch_size {inference_patch_size} exceeds the canvas ({convention.padded_size})")
    return PriorCheckpointDescription(
        net={"_target_": "diffinv_pl.priors.song_unet.song_unet_from_kwargs", **snap.song_unet_kwargs},
        objective="edm",
        objective_params={"sigma_data": snap.loss_params["sigma_data"], "p_mean": snap.loss_params["P_mean"],
                          "p_std": snap.loss_params["P_std"]},
        image_channels=snap.image_channels,
        data_range=tuple(data_range),
        model_range=tuple(data_range),
        positional_convention=convention,
        inference_patch_size=int(inference_patch_size),
        ema=True,
        sigma_range=EDM_SIGMA_RANGE,
    )


def load_padis_snapshot(
    path: str | Path,
    image_size: int = 256,
    expected_pad: int | None = None,
    expected_channels: int | None = None,
    inference_patch_size: int = 64,
) -> tuple[SongUNetPrecond, PriorCheckpointDescription]:
    """(D, description) from an official PaDIS snapshot: D(x, sigma, pos=...) on patches, weights loaded strictly,
    eval mode; the description carries the training convention (pad from the key names). Refuses (UserError) a file
    whose pad or channel count differs from ``expected_pad`` / ``expected_channels``."""
    snap = read_padis_snapshot(path)
    _check_expected(snap, snap.pad_width(image_size), f"snapshot {str(path)!r}", expected_pad, expected_channels)
    return build_padis_network(snap), padis_description(snap, image_size, inference_patch_size)


def convert_padis_snapshot(
    path: str | Path,
    out_dir: str | Path,
    image_size: int = 256,
    inference_patch_size: int = 64,
    expected_pad: int | None = None,
) -> Path:
    """Write ``OUT_DIR/model.safetensors`` (the ``model.*`` state dict, strictly checked against our SongUNet) and
    ``OUT_DIR/description.json``; returns OUT_DIR."""
    from safetensors.torch import save_file

    path, out_dir = Path(path), Path(out_dir)
    snap = read_padis_snapshot(path)
    _check_expected(snap, snap.pad_width(image_size), f"snapshot {str(path)!r}", expected_pad, None)
    model = build_padis_network(snap)  # proves the weights load strictly before anything is written
    desc = padis_description(snap, image_size, inference_patch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    info = {
        "format": CONVERTED_FORMAT,
        "source": {"file": path.name, "sha256": file_sha256(path), "class_name": snap.class_name,
                   "precond_kwargs": _plain(snap.precond_kwargs), "loss_params": snap.loss_params},
        "sigma_data": model.sigma_data,
        "prior": desc.to_dict(),
    }
    (out_dir / DESCRIPTION_FILE).write_text(json.dumps(info, indent=2, allow_nan=True))
    return out_dir


def load_converted_padis(
    out_dir: str | Path,
    expected_channels: int | None = None,
    expected_convention: PositionalConvention | Mapping | None = None,
) -> DiffusionPrior:
    """The converted network (``model.safetensors`` + ``description.json``) as a :class:`DiffusionPrior` (patch
    denoiser D(x, sigma, pos=...), its convention, ranges and description); no pickle is read."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    weights, info_path = out_dir / WEIGHTS_FILE, out_dir / DESCRIPTION_FILE
    for needed in (weights, info_path):
        if not needed.is_file():
            raise UserFileError(
                f"no {needed.name} in {str(out_dir)!r}: convert the official snapshot first with `python -m "
                "diffinv_pl.priors.edm_pickle convert network-snapshot-XXXXXX.pkl OUT_DIR --image-size 256` "
                "and give prior.path=OUT_DIR"
            )
    try:
        info = json.loads(info_path.read_text())
        desc = PriorCheckpointDescription.from_dict(info["prior"])
        state = load_file(str(weights))
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise UserError(f"{str(out_dir)!r} is not a readable converted PaDIS network ({type(err).__name__}: "
                        f"{str(err)[:300]}): convert the snapshot again") from err
    if info.get("format") != CONVERTED_FORMAT:
        raise UserError(f"{str(info_path)!r} has format {info.get('format')!r}, not {CONVERTED_FORMAT!r}: convert the "
                        "snapshot again with this version")
    where = f"converted network {str(out_dir)!r}"
    if expected_channels is not None and desc.image_channels != expected_channels:
        raise UserError(f"{where} denoises {desc.image_channels} channel(s) but {expected_channels} are expected")
    if expected_convention is not None:
        try:
            desc.positional_convention.assert_compatible(
                expected_convention, "(the network's, the expected) use the convention it was trained with"
            )
        except UserError as err:
            raise UserError(f"{where}: {err}") from err
    kwargs = {k: v for k, v in desc.net.items() if k != "_target_"}
    model = SongUNetPrecond(song_unet_from_kwargs(**kwargs), float(info.get("sigma_data", 0.5)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{where}: weights do not match its description ({str(err)[:600]}); convert again") from err
    return DiffusionPrior(model.eval().requires_grad_(False), desc.image_channels, desc.positional_convention,
                          desc.data_range, desc.model_range, desc.inference_patch_size, desc.sigma_range, desc)


def converted_padis_prior(
    path: str | Path,
    data_range: tuple[float, float] | None = None,
    patch_size: int | None = None,
    expected_channels: int | None = None,
    expected_convention: Mapping | None = None,
    per_sample_calls: bool = False,
) -> Prior:
    """The whole-image solver :class:`Prior` of a converted PaDIS network: patches assembled on a randomly shifted
    grid (``PatchAssembledPrior``), range-adapted when ``data_range`` differs from the training range ([0, 1])."""
    prior = load_converted_padis(path, expected_channels, expected_convention)
    whole = prior.whole_image(patch_size, per_sample_calls)
    target = tuple(data_range) if data_range is not None else prior.data_range
    if target is None or tuple(target) == tuple(prior.model_range):
        return whole
    return RangeAdaptedPrior(whole, target, prior.model_range)


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffinv_pl.priors.edm_pickle", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert network-snapshot-*.pkl to model.safetensors + description.json")
    conv.add_argument("snapshot", type=Path)
    conv.add_argument("out_dir", type=Path)
    conv.add_argument("--image-size", type=int, default=256, help="unpadded training image side N (PaDIS: 256)")
    conv.add_argument("--patch-size", type=int, default=64, help="inference patch size stored in the description")
    conv.add_argument("--expected-pad", type=int, default=None, help="refuse a snapshot trained with another pad")
    args = parser.parse_args(argv)
    out = convert_padis_snapshot(args.snapshot, args.out_dir, args.image_size, args.patch_size, args.expected_pad)
    desc = json.loads((out / DESCRIPTION_FILE).read_text())["prior"]
    print(f"wrote {out / WEIGHTS_FILE} and {out / DESCRIPTION_FILE} (convention {desc['positional_convention']})")


if __name__ == "__main__":
    main()
