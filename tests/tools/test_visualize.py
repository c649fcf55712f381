"""`atcache visualize`: PNG grids of the expected size, with and without a student; bad picks named."""

import numpy as np
import pytest
import zarr
from PIL import Image
from typer.testing import CliRunner

from atcache.cli import app
from atcache.cache.format import LETTERBOX_COLUMNS
from atcache.tools.visualize import map_on_image
from helpers import TEST_LAYERS

runner = CliRunner()
PX = int(2.6 * 80)  # one panel: 2.6 inches at 80 dpi


@pytest.mark.parametrize("with_student", [False, True])
def test_pngs_of_the_expected_size(built_cache, voc_yaml, teacher_pt, tmp_path, with_student):
    extra = ["--student", str(teacher_pt)] if with_student else []
    result = runner.invoke(app, ["visualize", str(built_cache), "--data", str(voc_yaml), "--out", str(tmp_path),
                                 "--images", "2", *extra])
    assert result.exit_code == 0, result.output
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2 and [str(p) for p in pngs] == result.output.split()
    for png in pngs:
        im = np.asarray(Image.open(png).convert("RGB"))
        assert im.shape[:2] == ((3 if with_student else 1) * PX, (len(TEST_LAYERS) + 1) * PX)
        assert im.std() > 10  # drawn, not blank


def test_named_files_and_refusals(built_cache, voc_yaml, tmp_path):
    first = zarr.open_group(str(built_cache), mode="r")["files"][3]
    ok = runner.invoke(app, ["visualize", str(built_cache), "--data", str(voc_yaml), "--out", str(tmp_path),
                             "--files", first])
    assert ok.exit_code == 0 and len(list(tmp_path.glob("*.png"))) == 1
    bad = runner.invoke(app, ["visualize", str(built_cache), "--data", str(voc_yaml), "--out", str(tmp_path),
                              "--files", "images/nope.jpg"])
    assert bad.exit_code == 2 and "images/nope.jpg is not in the cache" in bad.output


def test_map_on_image_follows_the_letterbox():
    # a 40x20 (h0, w0) image resized to 64x32 inside a 64x64 letterbox, padded 16 px left and right
    a = np.zeros((4, 4), np.float32)
    a[:, 1] = 1.0  # the second column of cells (letterboxed x 16..31) is the image's left half
    out = map_on_image(a, dict(zip(LETTERBOX_COLUMNS, [40, 20, 64, 32, 0, 16, 1.6])), 64)
    assert out.shape == (40, 20)
    # cell 1's centre is letterboxed x 23.5 = image x (23.5 - 16) / 1.6 = 4.7: the peak, fading to the right
    assert set(out.argmax(1)) <= {4, 5} and out[:, 15:].max() == 0 and out[:, :8].mean() > 0.6
