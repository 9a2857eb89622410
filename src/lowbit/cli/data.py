"""Data for the command line: image folders, .npy / .npz arrays, preprocessing, labels.

Images are read with Pillow, converted to RGB, resized so the short side is `size / 0.875`
(256 for 224, the usual ImageNet evaluation), center-cropped to `size`, scaled to [0, 1] and
normalized with a mean and std per channel:

    imagenet   mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)  (torchvision models)
    inception  mean 0.5, std 0.5: pixels to [-1, 1]  (EfficientNet-Lite, TF and Keras models)
    none       pixels in [0, 1]

Labels of an image folder come from class subfolders (sorted names, or their line in a
`synsets.txt`) or, in a flat folder, from file names `<synset>_<name>.JPEG` whose synset is looked
up in a `synsets.txt` next to or above the folder (line i = class i), as ImageNet samples are.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IMAGE_SUFFIXES",
    "PREPROCESSING",
    "Batches",
    "ImageBatches",
    "Preprocess",
    "TensorBatches",
    "load_data",
    "make_preprocess",
    "random_batches",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
PREPROCESSING: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
CROP_FRACTION = 0.875
_SYNSET = re.compile(r"^(n\d{8})_")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a tensor: optional resize + center crop, then (x/255 - mean) / std."""

    size: int | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 1:
            raise ValueError(f"--size must be a positive number of pixels, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(
                f"--mean and --std take 3 values (R G B), got {self.mean} and {self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"--std values must be positive, got {self.std}")

    def __call__(self, path: Path) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from None
        if self.size is not None:
            image = _resize_crop(image, self.size)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255.0
        x = pixels.permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


def _resize_crop(image: Any, size: int) -> Any:
    from PIL import Image

    short = round(size / CROP_FRACTION)
    w, h = image.size
    scale = short / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def make_preprocess(
    name: str = "imagenet",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    size: int | None = None,
) -> Preprocess:
    """A `Preprocess` from a preset name, with `mean` / `std` overriding the preset's."""
    if name not in PREPROCESSING:
        raise ValueError(f"--preprocess must be one of {sorted(PREPROCESSING)}, got {name!r}")
    preset_mean, preset_std = PREPROCESSING[name]
    return Preprocess(
        size=size,
        mean=tuple(mean) if mean is not None else preset_mean,
        std=tuple(std) if std is not None else preset_std,
    )


class Batches:
    """A re-iterable sequence of batches `(inputs, labels)` (or `(inputs,)` without labels)."""

    batch_size: int
    has_labels: bool

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    @property
    def num_samples(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for start in range(0, self.num_samples, self.batch_size):
            yield self._batch(start, min(start + self.batch_size, self.num_samples))

    def _batch(self, start: int, stop: int) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def example(self) -> Tensor:
        """One sample with a batch dimension of 1, for tracing and latency."""
        return self._batch(0, 1)[0]


class TensorBatches(Batches):
    """Batches over in-memory tensors (arrays from .npy / .npz, random data)."""

    def __init__(self, x: Tensor, y: Tensor | None, batch_size: int) -> None:
        if len(x) == 0:
            raise ValueError("the data hold no samples")
        self.x, self.y, self.batch_size = x, y, _check_batch_size(batch_size)
        self.has_labels = y is not None

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def _batch(self, start: int, stop: int) -> tuple[Tensor, ...]:
        x = self.x[start:stop]
        return (x,) if self.y is None else (x, self.y[start:stop])


class ImageBatches(Batches):
    """Images read and preprocessed one batch at a time."""

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int] | None,
        preprocess: Preprocess,
        batch_size: int,
    ) -> None:
        if not files:
            raise ValueError("the image folder holds no images")
        self.files, self.labels = list(files), None if labels is None else list(labels)
        self.preprocess, self.batch_size = preprocess, _check_batch_size(batch_size)
        self.has_labels = labels is not None

    @property
    def num_samples(self) -> int:
        return len(self.files)

    def _batch(self, start: int, stop: int) -> tuple[Tensor, ...]:
        images = [self.preprocess(f) for f in self.files[start:stop]]
        shapes = {tuple(t.shape) for t in images}
        if len(shapes) > 1:
            raise ValueError(
                f"images differ in size ({sorted(shapes)[:2]}...): pass --size to resize and "
                "center-crop them to one size"
            )
        x = torch.stack(images)
        if self.labels is None:
            return (x,)
        return x, torch.tensor(self.labels[start:stop], dtype=torch.long)


def _check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    return batch_size


def load_data(
    path: str | Path,
    preprocess: Preprocess,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    need_labels: bool = False,
) -> Batches:
    """Batches from an image folder, an .npy file (inputs) or an .npz file (x [, y]).

    `limit` keeps the first `limit` samples (sorted file order). With `need_labels`, data
    without labels are a ValueError saying how to label them.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        batches: Batches = _image_folder(path, preprocess, batch_size, limit)
    elif path.suffix in (".npy", ".npz"):
        batches = _arrays(path, batch_size, limit)
    else:
        raise ValueError(
            f"data must be a folder of images, an .npy or an .npz file, got {path.name!r}"
        )
    if need_labels and not batches.has_labels:
        raise ValueError(
            f"no labels for {path}: name files <synset>_<name>.JPEG with a synsets.txt next "
            "to or above the folder, sort images into class subfolders, or pass an .npz "
            "with arrays x and y"
        )
    return batches


def _image_folder(
    root: Path, preprocess: Preprocess, batch_size: int, limit: int | None
) -> Batches:
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and _images(d))
    synsets = find_synsets(root)
    files: list[Path]
    labels: list[int] | None
    if subdirs:
        names = [d.name for d in subdirs]
        index = (
            {s: i for i, s in enumerate(synsets)}
            if synsets and all(n in synsets for n in names)
            else {n: i for i, n in enumerate(names)}
        )
        pairs = [(f, index[d.name]) for d in subdirs for f in _images(d)]
        files, labels = [f for f, _ in pairs], [label for _, label in pairs]
    else:
        files = _images(root)
        labels = _synset_labels(files, synsets)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    if limit is not None:
        files = files[:limit]
        labels = None if labels is None else labels[:limit]
    return ImageBatches(files, labels, preprocess, batch_size)


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)


def find_synsets(folder: Path, levels: int = 3) -> list[str] | None:
    """The lines of the nearest synsets.txt in `folder` or up to `levels` folders above."""
    for candidate in [folder, *list(folder.resolve().parents)[:levels]]:
        path = candidate / "synsets.txt"
        if path.is_file():
            return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    return None


def _synset_labels(files: Sequence[Path], synsets: list[str] | None) -> list[int] | None:
    if synsets is None:
        return None
    index = {s: i for i, s in enumerate(synsets)}
    labels = []
    for f in files:
        match = _SYNSET.match(f.name)
        if match is None or match.group(1) not in index:
            return None
        labels.append(index[match.group(1)])
    return labels


def _arrays(path: Path, batch_size: int, limit: int | None) -> Batches:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read {path} as numpy data: {error}") from None
    y = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            x_key: str | None = next(
                (k for k in ("x", "inputs", "input", "images") if k in keys), None
            )
            x_key = x_key or (keys[0] if keys else None)
            if x_key is None:
                raise ValueError(f"{path} holds no arrays")
            x = loaded[x_key]
            y_key = next((k for k in ("y", "labels", "label", "targets") if k in keys), None)
            y = loaded[y_key] if y_key is not None else None
    else:
        x = loaded
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{path}: inputs must be numbers, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"{path}: inputs need a leading sample dimension, got shape {tuple(x.shape)}"
        )
    x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if not bool(torch.isfinite(x_t).all()):
        raise ValueError(f"{path}: inputs hold NaN or Inf")
    y_t = None
    if y is not None:
        if y.shape[:1] != x.shape[:1] or y.dtype.kind not in "iu":
            raise ValueError(
                f"{path}: labels y must be integers, one per sample; got shape "
                f"{tuple(y.shape)} dtype {y.dtype} for {len(x)} samples"
            )
        y_t = torch.from_numpy(y.astype(np.int64))
    if limit is not None:
        x_t = x_t[:limit]
        y_t = None if y_t is None else y_t[:limit]
    return TensorBatches(x_t, y_t, batch_size)


def random_batches(
    shape: Sequence[int], *, num_samples: int = 32, batch_size: int = 32, seed: int = 0
) -> Batches:
    """Standard-normal inputs of per-sample `shape`: a stand-in when no calibration data exist."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((num_samples, *shape), generator=generator)
    return TensorBatches(x, None, batch_size)
