"""benchmarks/bench_tower_reading.py: how fast the default tower learns to read the OCR images."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from dsvl2.checkpoint import load_model
from dsvl2.config import load_model_config
from dsvl2.defaults import default_model_dir
from dsvl2.processor import Processor
from dsvl2.projector import stitch_tiles
from tests.benchmarks import load_bench
from tests.conformance_data import REPO

SCRIPT = REPO / "benchmarks" / "bench_tower_reading.py"


def test_build_tower_loads_a_checkpoints_tower_or_makes_a_fresh_one():
    bench = load_bench("bench_tower_reading")
    folder = default_model_dir()
    cfg = load_model_config(folder).vision
    shipped = load_model(folder).vision.patch_embed.proj.weight
    torch.testing.assert_close(bench.build_tower(cfg, folder).patch_embed.proj.weight, shipped)
    assert not torch.equal(bench.build_tower(cfg, None).patch_embed.proj.weight, shipped)
    with pytest.raises(SystemExit, match="differs"):
        bench.build_tower(replace(cfg, width=64), folder)


def test_ctc_decode_merges_repeats_and_drops_blanks():
    bench = load_bench("bench_tower_reading")
    zero, one, a = (bench.ALPHABET.index(c) + 1 for c in "01a")
    assert bench.ctc_decode([0, zero, zero, 0, zero, one, one, 0, a]) == "001a"
    assert bench.ctc_decode([0, 0]) == ""


def test_line_rows_cover_the_ink_of_each_line_in_the_padded_view():
    bench = load_bench("bench_tower_reading")
    boxes = [["a", 10, 20, 30, 50, 0], ["b", 30, 22, 50, 52, 0], ["c", 10, 70, 30, 100, 1]]
    # scaled by 0.5 and shifted down 40 px: line 0 spans y 50..66 (rows 3..4 of 16 px), line 1 75..90 (4..5)
    assert bench.line_rows(boxes, 0, 0.5, 40, 16) == (3, 4)
    assert bench.line_rows(boxes, 1, 0.5, 40, 16) == (4, 5)


def test_text_images_bands_hold_the_dark_ink():
    bench = load_bench("bench_tower_reading")
    processor = Processor.from_pretrained(default_model_dir())
    size = processor.tile_size
    for item in bench.text_images(processor, 6, 3, "test", 16):
        pixels = item.tiles.permute(0, 2, 3, 1).reshape(len(item.tiles), size * size, 3)
        view = stitch_tiles(pixels, item.columns, item.rows).numpy()
        # the renderer's ink is darker than 70 in every channel; backgrounds and padding are 127 or lighter
        ink_rows = set((np.nonzero((view.max(axis=2) < 75).any(axis=1))[0] // 16).tolist())
        band_rows = {row for line in item.lines for row in range(line.first_row, line.last_row + 1)}
        assert ink_rows <= band_rows
        for line in item.lines:
            assert ink_rows & set(range(line.first_row, line.last_row + 1)), line


class _TileAndPatchIndex(nn.Module):
    """A stand-in tower whose feature at tile t, patch p is (t, p)."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tiles = pixels.shape[0]
        t = torch.arange(tiles, dtype=torch.float32)[:, None].expand(tiles, 4)
        p = torch.arange(4, dtype=torch.float32)[None].expand(tiles, 4)
        return torch.stack([t, p], dim=-1)


def test_patch_grid_stitches_row_major_tiles_into_the_view():
    bench = load_bench("bench_tower_reading")
    reader = bench.LineReader.__new__(bench.LineReader)
    nn.Module.__init__(reader)
    reader.tower, reader.outputs = _TileAndPatchIndex(), 1
    grid = reader.patch_grid(torch.zeros(6, 3, 2, 2), columns=3, rows=2)  # 2 rows of 3 tiles, 2x2 patches each
    assert grid.shape == (4, 6, 2)
    assert grid[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2]  # top patch row: tiles 0, 1, 2
    assert grid[3, :, 0].tolist() == [3, 3, 4, 4, 5, 5]  # bottom patch row: tiles 3, 4, 5
    assert grid[1, :, 1].tolist() == [2, 3, 2, 3, 2, 3]  # second patch row of each tile: patches 2 and 3


def test_a_short_run_lowers_the_ctc_loss_and_writes_its_table(tmp_path):
    out = tmp_path / "reading.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "60", "--eval-every", "30", "--micro-batch", "4",
         "--n-train", "24", "--n-test", "8", "--lr", "3e-3", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    first, last = report["history"]
    assert (first["step"], last["step"]) == (30, 60)
    assert last["loss"] < first["loss"] < report["first_loss"]
    assert last["loss"] < 0.5 * report["first_loss"]  # untrained, the loss stays near its first value
    assert 0.0 <= last["cer"] and 0.0 <= last["image_exact"] <= 1.0
    assert report["train_images"] == 24 and report["test_images"] == 8
    assert "image exact" in result.stdout
