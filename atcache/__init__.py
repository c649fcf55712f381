"""atcache: attention-transfer distillation for YOLO with the teacher run once (cached maps in Zarr)."""

__version__ = "0.1.0"

VOC_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
