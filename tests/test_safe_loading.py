"""No code path unpickles a file without an explicit allow-list (issue 14): every ``torch.load`` in the package, the
data_prep scripts and the experiment scripts passes ``weights_only=True`` (torch's restricted unpickler), ``np.load``
never allows pickles, diffusers ``from_pretrained`` runs offline, and ``pickle`` is only used through the restricted
unpickler of :mod:`diffinv_pl.priors.edm_pickle`. The per-format tests (test_edm_pickle, test_compvis_checkpoint,
test_adm_checkpoint, test_diffusers_prior) check with a pickle that would write a marker file that it is refused."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

SOURCES = sorted(
    p for root in ("diffinv_pl", "data_prep", "experiments") for p in (REPO / root).rglob("*.py")
) + [REPO / "train.py", REPO / "evaluate.py"]


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return ast.unparse(kw.value)
    return None


def test_the_scan_sees_the_loaders():
    seen = {name for p in SOURCES for _, name in _calls(p)}
    assert "torch.load" in seen and "np.load" in seen  # the scan really parses calls


def test_every_load_is_restricted():
    bad = []
    for path in SOURCES:
        rel = path.relative_to(REPO)
        for call, name in _calls(path):
            where = f"{rel}:{call.lineno} {name}"
            if name == "torch.load" and _keyword(call, "weights_only") != "True":
                bad.append(where + " without weights_only=True")
            elif name in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") not in (None, "False"):
                bad.append(where + " with allow_pickle")
            elif name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                bad.append(where + " (a plain unpickle)")
            elif name.endswith(".from_pretrained") and _keyword(call, "local_files_only") != "True":
                bad.append(where + " without local_files_only=True")
    assert not bad, "unrestricted loading:\n" + "\n".join(bad)
