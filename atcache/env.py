"""Keep ultralytics off the network: offline flag, a local config dir when asked, and a local font."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def prepare_ultralytics(config_dir: str | Path | None = None) -> None:
    """Set YOLO_OFFLINE (unless the user set it) and optionally YOLO_CONFIG_DIR, then install a local font.

    Must run before `ultralytics` is first imported for the config dir to take effect; ultralytics' dataset check
    calls check_font("Arial.ttf"), which downloads even when offline unless the font is already in its config dir.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    if config_dir is not None and "ultralytics" not in sys.modules:
        os.environ["YOLO_CONFIG_DIR"] = str(Path(config_dir).resolve())
    from ultralytics.utils import USER_CONFIG_DIR

    _install_font(USER_CONFIG_DIR)


def _install_font(config_dir: Path) -> None:
    """Copy matplotlib's DejaVuSans.ttf as the fonts ultralytics looks for, where they are missing."""
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in FONT_NAMES:
        target = config_dir / name
        if not target.exists() and source.exists():
            shutil.copyfile(source, target)
