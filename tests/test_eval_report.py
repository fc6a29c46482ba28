"""Report files from hand-made rows: mean ± std per configuration, CSV columns, a plot that opens."""

import csv
import io

import numpy as np
import pytest
from PIL import Image

from stylealigned.eval.report import COLUMNS, results_csv, summarize, write_reports

ROWS = [
    {"config": "full", "style_index": 0, "style": "ink, wash", "seed": 0, "text_alignment": 0.25,
     "set_consistency": 0.6, "set_consistency_includes_reference": True, "folder": "sets/full/000"},
    {"config": "full", "style_index": 1, "style": "oil", "seed": 100, "text_alignment": 0.29,
     "set_consistency": 0.4, "set_consistency_includes_reference": True, "folder": "sets/full/001"},
    {"config": "no-share", "style_index": 0, "style": "ink, wash", "seed": 0, "text_alignment": 0.31,
     "set_consistency": 0.2, "set_consistency_includes_reference": True, "folder": "sets/no-share/000"},
]


def test_summary_is_mean_and_std_over_sets_per_config():
    summary = summarize(ROWS)
    assert list(summary) == ["full", "no-share"]
    assert summary["full"]["sets"] == 2
    assert summary["full"]["text_alignment"] == pytest.approx((0.27, np.std([0.25, 0.29])))
    assert summary["full"]["set_consistency"] == pytest.approx((0.5, 0.1))
    assert summary["no-share"]["set_consistency"] == pytest.approx((0.2, 0.0))


def test_csv_round_trips_rows_with_commas_in_styles():
    table = list(csv.DictReader(io.StringIO(results_csv(ROWS))))
    assert list(table[0]) == COLUMNS
    assert [row["style"] for row in table] == ["ink, wash", "oil", "ink, wash"]
    assert [float(row["set_consistency"]) for row in table] == [0.6, 0.4, 0.2]


def test_reports_are_written(tmp_path):
    write_reports(tmp_path, ROWS, {"model": "tiny", "seed": 0})
    summary = (tmp_path / "summary.md").read_text()
    assert "| full | 2 | 0.270 ± 0.020 | 0.500 ± 0.100 |" in summary
    assert "| no-share | 1 | 0.310 ± 0.000 | 0.200 ± 0.000 |" in summary
    assert "0.287 ± 0.03 | 0.51 ± 0.14 |" in summary and "- model: `tiny`" in summary
    with Image.open(tmp_path / "tradeoff.png") as plot:
        plot.load()
        assert plot.format == "PNG"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.csv", "summary.md", "tradeoff.png"]
