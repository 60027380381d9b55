"""scripts/engram_name_sharing.py: each person's own share of its name rows, the groups by quantile,
and the per-person summary, against values worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import engram_name_sharing as sharing  # noqa: E402


def test_own_rows_are_those_no_other_person_reads():
    shares = sharing.own_row_shares({"a": {1, 2, 3, 4}, "b": {3, 4, 5}, "c": {4}, "d": set()})
    # a: 1, 2 its own (3 shared with b, 4 with b and c); b: 5 alone; c: none; d: no rows at all.
    assert shares == {"a": 0.5, "b": pytest.approx(1 / 3), "c": 0.0, "d": 1.0}


def test_groups_are_half_open_but_the_last_and_empty_ones_hold_nothing():
    edges = [0.2, 0.5, 0.5, 0.9]
    assert [sharing.group_of(x, edges) for x in (0.1, 0.2, 0.49, 0.5, 0.7, 0.9, 0.95)] == [-1, 0, 0, 2, 2, 2, -1]
    assert sharing.group_of(1.0, [0.0, 0.5, 1.0]) == 1  # the top edge is inclusive


def test_quantiles_interpolate_between_order_statistics():
    assert sharing.quantile([4.0, 1.0, 3.0, 2.0], 0.0) == 1.0
    assert sharing.quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert sharing.quantile([4.0, 1.0, 3.0, 2.0], 1.0) == 4.0
    assert sharing.quantile([7.0], 0.3) == 7.0


@pytest.mark.parametrize("text", ["0,x,1", "0.5", "0,1.5", "0,0.5,0.5,1", "1,0"])
def test_bad_bins_are_refused_with_the_fix(text):
    with pytest.raises(SystemExit, match="--bins"):
        sharing.parse_bins(text)
    assert sharing.parse_bins("0,0.25,1") == [0.0, 0.25, 1.0]


def test_summary_reads_each_persons_share_and_correlates_over_people():
    bits = {
        "engram": {"a": (1.0, 2.0), "b": (2.0, 2.0), "c": (0.0, 2.0)},  # shares 0.5, 1, 0
        "control": {"a": (1.0, 4.0), "b": (4.0, 4.0), "c": (0.0, 4.0)},  # 0.25, 1, 0: rises with engram
    }
    out = sharing.summary(bits, {"a": 0.2, "b": 0.2, "c": 0.2}, {"a": 5, "b": 7, "c": 3})
    assert out["people"] == 3
    assert out["engram_person_share_median"] == 0.5 and out["control_person_share_median"] == 0.25
    assert out["engram_person_share_p10"] == pytest.approx(0.1)  # 0 + 0.2 x (0.5 - 0)
    assert out["corr_engram_control"] > 0.9
    assert out["corr_engram_own_row_share"] is None  # a constant side has no correlation
    assert out["corr_engram_name_tokens"] == 1.0  # shares 0, 0.5, 1 against tokens 3, 5, 7
