"""atcache: attention-transfer distillation for YOLO with the teacher run once (cached maps in Zarr)."""

__version__ = "0.1.0"

VOC_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def open_cache(path):
    """A cache opened read-only for notebooks: spec, files, and per-layer dask arrays (see atcache.inspection)."""
    from atcache.inspection import open_cache as _open

    return _open(path)
