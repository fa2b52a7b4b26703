"""The stain preview grid (originals beside their normalised versions, fallbacks marked) and the
per-image cost measurement."""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks import stain_cost
from breakhis_ft.data.stain_preview import MARK, PreviewRow, choose_rows
from breakhis_ft.tools import stain_preview


def test_preview_grid_shows_every_class_and_marks_the_fallbacks(replica_root, tmp_path, capsys):
    out = tmp_path / "preview.png"
    argv = ["--root", str(replica_root), "--out", str(out), "--per-class", "1", "--scan", "2"]
    argv += ["--reference-images", "6", "--magnification", "100", "--hard-fields", "--width", "96"]
    assert stain_preview.main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "of the 18 images tried" in printed  # 8 classes x 2 + 2 fields
    assert "green_grey_lumen: stain check: the fitted haematoxylin" in printed
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape[1] == 170 + 3 * (96 + 8)  # label column, original, macenko, reinhard
    frame = np.all(grid == MARK, axis=-1)
    assert frame.sum() > 4 * 96  # the lumen field's two results are framed in red


def test_choose_rows_puts_the_fallbacks_first():
    blank = Image.new("RGB", (4, 4))
    rows = [
        PreviewRow("a", "1", blank, {"macenko": (blank, None)}),
        PreviewRow("a", "2", blank, {"macenko": (blank, "stain check: x")}),
        PreviewRow("b", "3", blank, {"macenko": (blank, None)}),
    ]
    assert [r.name for r in choose_rows(rows, 1)] == ["2", "3"]


def test_cost_is_measured_per_method():
    result = stain_cost.measure_cost(n_images=2, size=(175, 115), n_reference=2)
    assert set(result["methods"]) == {"macenko", "reinhard"} and result["size"] == [175, 115]
    for timings in result["methods"].values():
        for what in ("normalize", "torchstain_whole_image"):
            assert 0 < timings[what]["cpu_s_median"] < 10
    assert "| macenko | normalize |" in stain_cost.table(result)
