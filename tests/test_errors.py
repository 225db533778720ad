"""UserError reporting: found through Hydra-style wrapping, and worker tracebacks stripped from the message."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, Dataset

from diffinv_pl.errors import UserError, find_user_error, report_user_errors, user_message


class _Bad(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise UserError("image 'k' in x.png has NaN values: clean the file")


def test_user_error_is_found_behind_a_wrapping_error_and_reported_in_one_line(capsys):
    @report_user_errors
    def main():
        try:
            raise UserError("set solver.zeta >= 0")
        except UserError as err:
            raise RuntimeError("Error in call to target") from err

    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: set solver.zeta >= 0\n"
    assert find_user_error(RuntimeError("a bug")) is None


def test_worker_traceback_is_stripped_from_the_message():
    with pytest.raises(UserError) as info:
        list(DataLoader(_Bad(), num_workers=1))
    assert "Traceback" in str(info.value)  # what torch re-raises
    assert user_message(info.value) == "image 'k' in x.png has NaN values: clean the file"
