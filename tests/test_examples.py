"""examples/quickstart.py runs end to end with the bundled model and draws its boxes."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from tests.conformance_data import REPO

EXAMPLES = REPO / "examples"


def test_example_images_are_small_pngs():
    images = sorted((EXAMPLES / "images").glob("*.png"))
    assert len(images) >= 2
    for path in images:
        assert path.stat().st_size < 64 * 1024, path
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB"


def test_quickstart_runs_and_draws_the_box(tmp_path):
    out = tmp_path / "boxes.png"
    result = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "grid box" in result.stdout
    with Image.open(out) as drawn, Image.open(EXAMPLES / "images" / "shapes.png") as original:
        assert drawn.size == original.size
        assert drawn.convert("RGB").tobytes() != original.convert("RGB").tobytes()
