"""The 500-image ImageNet sample of the shared data folder, decoded once into one tensor.

The folder (`dev/<synset>_<name>.JPEG`, short side already 256, and `synsets.txt` in class-index
order) comes from `--data`, else the LOWBIT_IMAGENET_SAMPLE environment variable, else
`../shared/data/imagenet-sample` next to the repository. Benchmarks that need it and find none
say so and exit 0: it is not part of the repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ENV_VAR = "LOWBIT_IMAGENET_SAMPLE"
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_dir() -> Path:
    """LOWBIT_IMAGENET_SAMPLE if set, else `../shared/data/imagenet-sample` from the repo root."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data" / "imagenet-sample"


def missing_reason(data_dir: Path) -> str | None:
    """Why `data_dir` is not a usable sample folder, or None if it is."""
    if not (data_dir / "dev").is_dir() or not (data_dir / "synsets.txt").is_file():
        return (
            f"ImageNet sample not found at {data_dir} (needs dev/ and synsets.txt); pass "
            f"--data DIR or set {ENV_VAR}"
        )
    return None


def find_data_dir(data: Path | None, bench: str) -> Path | None:
    """`data` or `default_data_dir()`; None, after saying why `bench` is skipped, if unusable."""
    data_dir = data or default_data_dir()
    reason = missing_reason(data_dir)
    if reason:
        print(f"skipping {bench}: {reason}")
        return None
    return data_dir


@dataclass(frozen=True)
class ImageSample:
    """Center-cropped RGB images as uint8 [N, 3, crop, crop], their labels and file names."""

    images: Tensor
    labels: Tensor
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def split(self, n_first: int) -> tuple[ImageSample, ImageSample]:
        """The first `n_first` images (sorted file order) and the rest."""
        head = ImageSample(self.images[:n_first], self.labels[:n_first], self.names[:n_first])
        tail = ImageSample(self.images[n_first:], self.labels[n_first:], self.names[n_first:])
        return head, tail


def center_crop_uint8(path: Path, crop: int = 224, resize_short: int | None = None) -> Tensor:
    """Decode with PIL to RGB, optionally resize the short side, center crop: uint8 CHW."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if resize_short is not None and min(img.size) != resize_short:
            w, h = img.size
            scale = resize_short / min(w, h)
            size = (max(crop, round(w * scale)), max(crop, round(h * scale)))
            img = img.resize(size, Image.Resampling.BICUBIC)
        w, h = img.size
        if min(w, h) < crop:
            raise ValueError(f"{path.name} is {w}x{h}, smaller than the {crop} crop")
        left, top = (w - crop) // 2, (h - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.reshape(crop, crop, 3).permute(2, 0, 1).contiguous()


def load_sample(data_dir: Path, crop: int = 224, resize_short: int | None = 256) -> ImageSample:
    """Every image of `data_dir/dev` in sorted file order, center-cropped, with its class index."""
    synsets = (data_dir / "synsets.txt").read_text().split()
    index = {s: i for i, s in enumerate(synsets)}
    paths = sorted((data_dir / "dev").glob("*.JPEG"))
    if not paths:
        raise FileNotFoundError(f"no .JPEG files in {data_dir / 'dev'}")
    images = torch.empty(len(paths), 3, crop, crop, dtype=torch.uint8)
    labels = torch.empty(len(paths), dtype=torch.long)
    for i, path in enumerate(paths):
        synset = path.name.split("_", 1)[0]
        if synset not in index:
            raise ValueError(f"{path.name}: synset {synset!r} is not in synsets.txt")
        images[i] = center_crop_uint8(path, crop, resize_short)
        labels[i] = index[synset]
    return ImageSample(images, labels, tuple(p.name for p in paths))


def inception_pixels(images: Tensor) -> Tensor:
    """uint8 RGB to float in [-1, 1], the input EfficientNet-Lite was trained on."""
    return (images.float() - 127.5) / 127.5


@dataclass(frozen=True)
class PixelSplit:
    """Inception-scaled pixels: calibration images, evaluation images and their labels."""

    calib: Tensor
    evals: Tensor
    labels: Tensor


def calib_eval_split(data_dir: Path, n_calib: int, eval_limit: int | None = None) -> PixelSplit:
    """The first `n_calib` images (sorted file order) to calibrate on, the next `eval_limit`
    (default: all the others) to evaluate on, as `inception_pixels`."""
    sample = load_sample(data_dir)
    x = inception_pixels(sample.images)
    end = None if eval_limit is None else n_calib + eval_limit
    return PixelSplit(x[:n_calib], x[n_calib:end], sample.labels[n_calib:end])
