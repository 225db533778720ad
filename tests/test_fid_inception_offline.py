"""The pinned Inception FID pipeline (torchmetrics + torch-fidelity) runs offline from a local weights file.

The real weights cannot be downloaded here, so the test writes a randomly initialised TF-Inception state dict of the
right layout and checks that the pipeline loads it from disk (no network) and produces a finite FID that is 0 for
identical sets and grows with a shift of one set.
"""

from __future__ import annotations

import pytest
import torch

torch_fidelity = pytest.importorskip("torch_fidelity")  # a declared dependency; absent only in a broken install


def test_inception_fid_loads_local_weights_and_measures_a_shift(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from diffinv_pl.metrics.fid_stats import INCEPTION_FEATURE, ReferenceFID

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    random_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    path = tmp_path / "inception.pth"
    torch.save(random_net.state_dict(), path)

    def fid_between(a, b):
        fid = ReferenceFID(feature=2048, normalize=True, antialias=False, feature_extractor_weights_path=str(path),
                           reference=None, feature_name=INCEPTION_FEATURE)
        fid.update(a, real=True)
        fid.update(b, real=False)
        return float(fid.compute())

    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 64, 64, generator=g)
    same = fid_between(images, images)
    shifted = fid_between(images, (images * 0.5).clamp(0, 1))
    # random weights give tiny feature scales, so compare relatively: identical sets are ~0, a shift is not
    assert shifted > 0 and abs(same) <= 1e-6 * shifted
