"""Official PaDIS snapshots read without executing pickled code: an EDM-layout pickle written here (persistence records
whose embedded source would create a marker file), malicious pickles, conflicts, truncation, and the safetensors
conversion round trip."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.priors.edm_pickle import (
    converted_padis_prior,
    load_converted_padis,
    load_padis_snapshot,
    main,
)
from diffinv_pl.priors.patch_denoiser import PatchAssembledPrior
from diffinv_pl.priors.song_unet import SongUNetPrecond, song_unet_from_kwargs

IMAGE_SIZE, PAD = 8, 4  # canvas R = 16
SONG_KWARGS = dict(
    embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
    resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.05,
)
PRECOND_KWARGS = dict(img_resolution=IMAGE_SIZE + 2 * PAD, img_channels=3, out_channels=1, label_dim=0, use_fp16=False,
                      model_type="SongUNet", hash_channels=1)
EDM_NAMES = {"SongUNetPrecond": "Patch_EDMPrecond", "EDMConv2d": "Conv2d", "EDMLinear": "Linear",
             "EDMGroupNorm": "GroupNorm", "SongUNetBlock": "UNetBlock"}


def marker_source(marker: Path) -> str:
    """Module source that, if it were ever executed, would create ``marker``."""
    return f"open({str(marker)!r}, 'w').write('executed')\nclass Patch_EDMPrecond: pass\n"


class _Persistent:
    """Pickles like an EDM ``persistence`` object: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, reconstruct, meta: dict) -> None:
        self.reconstruct, self.meta = reconstruct, meta

    def __reduce__(self):
        return (self.reconstruct, (self.meta,))


def _edm_layout(module: nn.Module, reconstruct, source: str, init_kwargs: dict | None = None):
    """``module`` as EDM would pickle it: persistence records for our layers, real ``nn.ModuleDict`` containers."""
    children = {name: _edm_layout(child, reconstruct, source) for name, child in module._modules.items()}
    if isinstance(module, nn.ModuleDict):
        container = nn.ModuleDict()
        container.__dict__["_modules"] = children  # records instead of modules, pickled as ModuleDict state
        return container
    state = {k: v for k, v in module.__dict__.items() if k != "_modules"}
    state["_modules"] = children
    state["_init_args"], state["_init_kwargs"] = (), dict(init_kwargs or {})
    meta = dict(type="class", version=6, module_src=source, class_name=EDM_NAMES.get(type(module).__name__, "X"),
                state=state)
    return _Persistent(reconstruct, meta)


@pytest.fixture
def fake_persistence(monkeypatch):
    """A stand-in ``torch_utils.persistence`` module, present only while a snapshot is written."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: the loader must not resolve the real one
        raise AssertionError("the real persistence reconstructor was called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return _reconstruct_persistent_obj


def tiny_network(seed: int = 0) -> SongUNetPrecond:
    torch.manual_seed(seed)
    net = SongUNetPrecond(song_unet_from_kwargs(img_resolution=IMAGE_SIZE + 2 * PAD, in_channels=3, out_channels=1,
                                                **SONG_KWARGS))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval().requires_grad_(False)


def write_snapshot(path: Path, net: nn.Module, reconstruct, marker: Path, kwargs: dict | None = None) -> Path:
    source = marker_source(marker)
    ema = _edm_layout(net, reconstruct, source, {**PRECOND_KWARGS, **SONG_KWARGS, **(kwargs or {})})
    loss = _Persistent(reconstruct, dict(type="class", version=6, module_src=source, class_name="Patch_EDMLoss",
                                         state={"P_mean": -1.2, "P_std": 1.2, "sigma_data": np.float64(0.5)}))
    data = dict(ema=ema, loss_fn=loss, augment_pipe=None,
                dataset_kwargs={"path": "x.zip", "resolution": IMAGE_SIZE, "max_size": np.int64(10)})
    with path.open("wb") as fh:
        pickle.dump(data, fh)
    return path


@pytest.fixture
def snapshot(tmp_path, fake_persistence):
    marker = tmp_path / "marker.txt"
    path = write_snapshot(tmp_path / "network-snapshot-000010.pkl", tiny_network(), fake_persistence, marker)
    sys.modules.pop("torch_utils.persistence")  # as on a machine without EDM's code
    return path, marker


def test_edm_layout_snapshot_loads_strictly_without_running_its_source(snapshot):
    path, marker = snapshot
    raw = path.read_bytes()
    assert b"torch_utils.persistence" in raw and b"ModuleDict" in raw and b"_rebuild_tensor_v2" in raw
    assert b"_load_from_bytes" in raw and b"_rebuild_parameter" in raw
    net, desc = load_padis_snapshot(path, image_size=IMAGE_SIZE, expected_pad=PAD, expected_channels=1,
                                    inference_patch_size=8)
    assert not marker.exists()
    ref = tiny_network()
    assert list(net.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)
    assert desc.positional_convention.image_size == IMAGE_SIZE and desc.positional_convention.pad_width == PAD
    assert desc.positional_convention.normalization == "canvas"
    assert desc.image_channels == 1 and desc.inference_patch_size == 8 and desc.ema
    assert desc.objective_params == {"sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2}
    assert desc.net["model_channels"] == 16 and desc.net["in_channels"] == 3 and desc.net["img_resolution"] == 16
    x, pos, sigma = torch.randn(2, 1, 8, 8), torch.rand(2, 2, 8, 8), torch.tensor([0.05, 2.0])
    torch.testing.assert_close(net(x, sigma, pos=pos), ref(x, sigma, pos=pos), rtol=0, atol=0)


def test_malicious_reduce_globals_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned.txt"

    class SystemCall:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class ExecCall:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    class SubprocessCall:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(marker)],))

    for name, payload in [("system", SystemCall()), ("exec", ExecCall()), ("subprocess", SubprocessCall())]:
        path = tmp_path / f"network-snapshot-{name}.pkl"
        path.write_bytes(pickle.dumps({"ema": payload}))
        with pytest.raises(UserError, match=r"refused to unpickle global (posix|os|builtins|subprocess)\.(system|exec|call)"):
            load_padis_snapshot(path, image_size=IMAGE_SIZE)
        assert not marker.exists()
    # the same payload really does create the marker with the ordinary unpickler (the test can fail)
    pickle.loads(pickle.dumps(ExecCall()))
    assert marker.exists()


def test_persistence_record_with_malicious_source_is_recorded_not_executed(tmp_path, fake_persistence):
    marker = tmp_path / "pwned.txt"
    meta = dict(type="class", version=6, module_src=marker_source(marker), class_name="Patch_EDMPrecond", state={})
    path = tmp_path / "network-snapshot-evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Persistent(fake_persistence, meta)}))
    with pytest.raises(UserError, match="only SongUNet .* is supported"):
        load_padis_snapshot(path, image_size=IMAGE_SIZE)
    assert not marker.exists()
    exec(compile(meta["module_src"], "<snapshot source>", "exec"), {})  # what EDM's loader would do
    assert marker.exists()


def test_pad_and_channel_conflicts_are_clear_errors(snapshot):
    path, _ = snapshot
    with pytest.raises(UserError, match=r"trained with pad 4 \(canvas 16 = 8 \+ 2\*4\) but pad 24 is expected"):
        load_padis_snapshot(path, image_size=IMAGE_SIZE, expected_pad=24)
    with pytest.raises(UserError, match=r"denoises 1 channel\(s\) but 3 are expected"):
        load_padis_snapshot(path, image_size=IMAGE_SIZE, expected_channels=3)
    with pytest.raises(UserError, match="canvas side 16 .* is not image_size \\+ 2\\*pad for image_size 7"):
        load_padis_snapshot(path, image_size=7)


def test_unsupported_kwargs_are_refused(tmp_path, fake_persistence):
    path = write_snapshot(tmp_path / "s.pkl", tiny_network(), fake_persistence, tmp_path / "m", {"implicit_mlp": True})
    with pytest.raises(UserError, match=r"argument\(s\) \['implicit_mlp'\]"):
        load_padis_snapshot(path, image_size=IMAGE_SIZE)
    path = write_snapshot(tmp_path / "s.pkl", tiny_network(), fake_persistence, tmp_path / "m", {"hash_channels": 4})
    with pytest.raises(UserError, match="hash_channels=4"):
        load_padis_snapshot(path, image_size=IMAGE_SIZE)


def test_truncated_missing_and_foreign_files(snapshot, tmp_path):
    path, _ = snapshot
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_padis_snapshot(truncated, image_size=IMAGE_SIZE)
    with pytest.raises(UserFileError, match="no PaDIS network snapshot at .*missing.pkl.*put it at that path"):
        load_padis_snapshot(tmp_path / "missing.pkl")
    torch.save({"ema": torch.zeros(2)}, tmp_path / "torch.pt")
    with pytest.raises(UserError, match="truncated or corrupt|persistent ids"):
        load_padis_snapshot(tmp_path / "torch.pt")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(UserError, match="expected a dict with an 'ema' network"):
        load_padis_snapshot(tmp_path / "list.pkl")


def test_convert_to_safetensors_and_load_as_patch_prior(snapshot, tmp_path, capsys):
    path, marker = snapshot
    out = tmp_path / "converted"
    main(["convert", str(path), str(out), "--image-size", str(IMAGE_SIZE), "--patch-size", "8"])
    assert "model.safetensors" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "description.json").is_file()
    assert not marker.exists()
    prior = load_converted_padis(out, expected_channels=1, expected_convention={"image_size": 8, "pad_width": 4})
    net, _ = load_padis_snapshot(path, image_size=IMAGE_SIZE, inference_patch_size=8)
    x, pos, sigma = torch.randn(3, 1, 8, 8), torch.rand(3, 2, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    torch.testing.assert_close(prior.denoiser(x, sigma, pos=pos), net(x, sigma, pos=pos), rtol=0, atol=0)
    assert prior.convention.pad_width == 4 and prior.max_patch_size == 8 and prior.sigma_range == (0.002, 80.0)
    with pytest.raises(UserError, match="pad_width: 4 != 24"):
        load_converted_padis(out, expected_convention={"image_size": 8, "pad_width": 24})
    whole = converted_padis_prior(out)
    assert isinstance(whole, PatchAssembledPrior)
    images = torch.rand(2, 1, 8, 8)
    # the state is the 16 x 16 canvas padded with the data-unit zero (PaDIS's [0, 1] range: 0)
    assert whole.state_shape((1, 8, 8)) == (1, 16, 16) and whole.pad_value == 0.0
    den = whole.decode(whole.denoise(whole.encode(images), torch.tensor(0.5), generator=torch.Generator().manual_seed(0)))
    assert den.shape == (2, 1, 8, 8) and torch.isfinite(den).all() and not torch.equal(den, images)
    (out / "description.json").unlink()
    with pytest.raises(UserFileError, match="no description.json"):
        load_converted_padis(out)


def test_cli_reports_user_errors_with_exit_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tmp_path / "nothing.pkl"), str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "no PaDIS network snapshot" in capsys.readouterr().err
