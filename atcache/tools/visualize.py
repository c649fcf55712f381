"""`atcache visualize`: PNG grids of cached attention maps over their images (and a student's maps beside them); for
a cache with input gradients (build-cache --gradient) also the gradient attention, the paper's picture: sum over
channels of |J|^2, normalised (atcache.attention.gradient.gradient_attention)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from atcache.config import check_replay
from atcache.errors import AtcacheError
from atcache.settings import VisualizeConfig


def map_on_image(a: np.ndarray, letterbox: dict[str, float], imgsz: int) -> np.ndarray:
    """A (H, W) map stretched over the imgsz x imgsz letterboxed input, cropped to the image and resized to the
    original (h0, w0): the map in the original image's pixels. `letterbox`: one row by column name."""
    h0, w0, h, w, top, left = (int(round(letterbox[c])) for c in ("h0", "w0", "h", "w", "pad_top", "pad_left"))
    full = cv2.resize(a.astype(np.float32), (imgsz, imgsz), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(full[top:top + h, left:left + w], (w0, h0), interpolation=cv2.INTER_LINEAR)


def _choose_rows(files: np.ndarray, done: np.ndarray, images: int, wanted: Sequence[str], root: Path) -> list[int]:
    """Rows of the named images (relative to the dataset root or absolute), or `images` done rows spread evenly."""
    from atcache.data.splits import relative_to_root

    if wanted:
        row_of = {f: r for r, f in enumerate(files)}
        rows = []
        for name in wanted:
            key = relative_to_root(name, root) if Path(name).is_absolute() else Path(name).as_posix()
            if key not in row_of:
                raise AtcacheError(f"{name} is not in the cache; pass paths relative to the dataset root ({root})")
            if not done[row_of[key]]:
                raise AtcacheError(f"{name} has no cached maps yet (row not done); finish the cache with build-cache --resume")
            rows.append(row_of[key])
        return rows
    candidates = np.flatnonzero(done)
    if not len(candidates):
        raise AtcacheError("the cache has no finished rows to show")
    return sorted({int(candidates[int(i)]) for i in np.linspace(0, len(candidates) - 1, min(images, len(candidates)))})


def _student_maps(student: str, images, layers: Sequence[int], spec, nc: int) -> list[list[np.ndarray]]:
    """The student's attention maps (per image, per layer) on the same inputs the teacher saw: images (n, 3, S, S)
    uint8 RGB."""
    from atcache.attention.recipe import layer_maps
    from atcache.yolo import load_model

    model = load_model(student, nc=nc, device="cpu").model
    maps, _ = layer_maps(model, images, layers, spec.p, spec.kind, spec.eps)
    out = [[None] * len(layers) for _ in range(len(images))]
    for k, (layer, m) in enumerate(zip(layers, maps)):
        want = (spec.layer(layer).height, spec.layer(layer).width)
        if tuple(m.shape[-2:]) != want:
            raise AtcacheError(f"student layer {layer} gives {tuple(m.shape[-2:])} maps, the cache {want}; "
                               "the student must share the teacher's layer strides (same YOLO family)")
        for n, a in enumerate(m.numpy()):
            out[n][k] = a
    return out


def _cached_panels(opened, split, images: int, files: Sequence[str]):
    """(names, BGR pictures, letterboxes, per picture the cached maps per layer, the teacher's inputs (n, 3, S, S)
    uint8 RGB, gradients) of images of the cache's split; the inputs are made as build-cache makes them
    (`LetterboxedImages`); gradients: None, or (J_T (n, 3, G, G), their label batch) of a cache with input gradients."""
    from atcache.attention.gradient import loss_labels
    from atcache.data.splits import LetterboxedImages, read_image

    rows = _choose_rows(opened.files, opened.done, images, files, split.root)
    pictures = [read_image(split.root / opened.files[r]) for r in rows]
    loaded = LetterboxedImages(split, rows, opened.spec.imgsz, labels=opened.grad is not None)
    _, inputs, _, errors, labels = LetterboxedImages.collate([loaded[k] for k in range(len(rows))])
    if any(errors):
        raise AtcacheError(next(e for e in errors if e))
    maps = [[opened.maps[i][r].compute().astype(np.float32) for i in opened.layers] for r in rows]
    grads = None
    if opened.grad is not None:
        grads = (np.stack([opened.grad[r].compute() for r in rows]), loss_labels(labels))
    names = [Path(opened.files[r]).name for r in rows]
    return names, pictures, [opened.letterbox.row(r) for r in rows], maps, inputs, grads


def _replay_panels(cache, data, spec, epoch: int, images: int):
    """The same for `images` positions spread over replay epoch `epoch`: the augmented images (rebuilt as training
    sees them, fingerprints checked) with the teacher's maps on them."""
    import torch

    from atcache.yolo import prepare

    prepare()
    from atcache.train.replay import ReplayTargets, augment_settings, training_dataset
    from atcache.train.samplers import EpochSampler

    replay = spec.replay
    check_replay(cache, replay, {}, instead="drop --epoch")
    if not 0 <= epoch < replay.epochs:
        raise AtcacheError(f"--epoch {epoch} is not among the cached epochs 0..{replay.epochs - 1}")
    dataset, root = training_dataset(str(data), augment_settings(dict(replay.augment), replay.epochs, spec.imgsz),
                                     replay.aug_seed)
    with_grad = bool(spec.gradient_stride)
    targets = ReplayTargets(str(cache), spec, spec.layer_indices, gradients=with_grad)
    targets.check(dataset.im_files, root["path"])
    order = EpochSampler(replay.samples, replay.aug_seed).order(epoch)
    positions = np.unique(np.linspace(0, replay.samples - 1, min(images, replay.samples)).astype(int))
    names, pictures, maps, samples, grads = [], [], [], [], []
    for p in positions:
        index = int(order[p])
        sample = dataset[epoch * replay.samples + index]
        image = sample["img"]
        names.append(f"e{epoch} p{p}: {Path(dataset.im_files[index]).name}")
        pictures.append(np.ascontiguousarray(image.numpy().transpose(1, 2, 0)[..., ::-1]))  # RGB CHW -> BGR HWC
        maps.append(targets.maps(epoch, index, image))
        samples.append(sample)
        if with_grad:
            direction, norm = targets.gradient(epoch, index)
            grads.append(direction.astype(np.float32) * norm)
    full = {"h0": spec.imgsz, "w0": spec.imgsz, "h": spec.imgsz, "w": spec.imgsz, "pad_top": 0, "pad_left": 0}
    inputs = torch.stack([sample["img"] for sample in samples])  # already the imgsz x imgsz training input
    if with_grad:
        from atcache.attention.gradient import loss_labels

        batch = dataset.collate_fn(samples)
        grads = (np.stack(grads), loss_labels(batch))
    return names, pictures, [full] * len(names), maps, inputs, grads if with_grad else None


def _gradient_pictures(J: np.ndarray) -> list[np.ndarray]:
    """The paper's gradient attention (G, G) of each J (n, 3, G, G)."""
    import torch

    from atcache.attention.gradient import gradient_attention

    return list(gradient_attention(torch.from_numpy(J).double()).float().numpy())


def _student_gradients(student: str, images, labels: dict, stride: int, nc: int) -> np.ndarray:
    """The student's J_S (n, 3, G, G) on the same inputs (n, 3, S, S) uint8 RGB and labels as the cached J_T: eval
    mode, per image, pooled."""
    from atcache.attention.gradient import input_gradient, pool_gradient
    from atcache.yolo import load_model

    model = load_model(student, nc=nc, device="cpu", fuse=False).model
    return pool_gradient(input_gradient(model, images.float() / 255, labels), stride).numpy()


def visualize_cache(cache: str | Path, data: str | Path, out: str | Path, images: int = VisualizeConfig.images,
                    files: Sequence[str] = VisualizeConfig.files,
                    student: str | None = None, epoch: int | None = None) -> list[Path]:
    """One PNG per image: the image, then per layer the teacher's cached map over it (and, with cached input gradients,
    the teacher's gradient attention); with a student, a row of the student's maps (and gradient attention on the same
    input and labels) and a row of |student - teacher| with the AT distance in the titles. With `epoch`, the augmented
    images of that replay epoch with their replayed maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from atcache.data.splits import split_files
    from atcache.cache.inspect import open_cache

    opened = open_cache(cache)
    spec = opened.spec
    split = split_files(data, spec.split)
    if split.fingerprint() != spec.dataset_fingerprint:
        raise AtcacheError(f"the {spec.split} split of {data} is not the dataset cache {cache} was built on; "
                           "pass the data YAML the cache was built with")
    if epoch is None:
        names, pictures, letterboxes, teacher, inputs, grads = _cached_panels(opened, split, images, files)
    else:
        names, pictures, letterboxes, teacher, inputs, grads = _replay_panels(cache, data, spec, epoch, images)
    layers = opened.layers
    students = _student_maps(student, inputs, layers, spec, len(split.names)) if student else None
    if grads is not None:  # one more column: the gradient attention, as one more "layer" of maps
        for maps, picture in zip(teacher, _gradient_pictures(grads[0])):
            maps.append(picture)
        if student:
            J_S = _student_gradients(student, inputs, grads[1], spec.gradient_stride, len(split.names))
            for maps, picture in zip(students, _gradient_pictures(J_S)):
                maps.append(picture)
    columns = [(f"L{i}", f"(s{spec.layer(i).stride})") for i in layers]
    columns += [("dL/dx", f"(s{spec.gradient_stride})")] if grads is not None else []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for n, (name, picture, letterbox) in enumerate(zip(names, pictures, letterboxes)):
        rgb = picture[..., ::-1]
        grid_rows = 3 if students else 1
        fig, axes = plt.subplots(grid_rows, len(columns) + 1, figsize=(2.6 * (len(columns) + 1), 2.6 * grid_rows),
                                 squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        axes[0, 0].imshow(rgb)
        axes[0, 0].set_title(name, fontsize=8)
        for k, (what, stride) in enumerate(columns):
            t = teacher[n][k]
            axes[0, k + 1].imshow(rgb)
            axes[0, k + 1].imshow(map_on_image(t, letterbox, spec.imgsz), cmap="jet", alpha=0.5)
            axes[0, k + 1].set_title(f"teacher {what} {stride}", fontsize=8)
            if students:
                s = students[n][k]
                distance = float(np.linalg.norm(s - t))
                axes[1, k + 1].imshow(rgb)
                axes[1, k + 1].imshow(map_on_image(s, letterbox, spec.imgsz), cmap="jet", alpha=0.5)
                axes[1, k + 1].set_title(f"student {what}", fontsize=8)
                axes[2, k + 1].imshow(map_on_image(np.abs(s - t), letterbox, spec.imgsz), cmap="magma")
                axes[2, k + 1].set_title(f"|S-T| {what} AT {distance:.3f}", fontsize=8)
        fig.tight_layout()
        stem = Path(name.rsplit(": ", 1)[-1]).stem
        path = out / (f"{n:03d}_{stem}.png" if epoch is None else f"e{epoch:03d}_{n:03d}_{stem}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
