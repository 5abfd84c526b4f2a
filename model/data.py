"""Training data: images scaled to [-1, 1] (the range EDM's sigma_data = 0.5 assumes) with labels.

Two sources:

* ``load_digits_dataset()``: scikit-learn's handwritten digits, 1,797 grayscale 8x8 images with
  values 0..16 and classes 0..9 (shipped with scikit-learn, so no download);
* ``load_png_folder(folder, labels)``: a folder of same-size square PNGs plus an optional labels
  file, so users can train on their own small sets.

Labels file formats (one of):

* ``dataset.json`` as written by NVlabs' dataset_tool: ``{"labels": [["a.png", 3], ...]}``;
* a text/CSV file, one ``FILE,LABEL`` (or ``FILE LABEL``) per line; ``#`` starts a comment.

Integer labels 0..K-1 are used as they are (class names "0".."K-1"); any other labels are class
names, numbered in sorted order.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["ImageDataset", "load_digits_dataset", "load_png_folder", "load_dataset"]


@dataclass
class ImageDataset:
    """Images float32 [N, C, H, W] in [-1, 1]; labels int64 [N] or None (unconditional)."""

    images: Tensor
    labels: Tensor | None
    class_names: list[str] | None
    description: dict[str, Any] = field(default_factory=dict)  # what the model card's provenance records

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[2] != self.images.shape[3]:
            raise ValueError(f"images must be [N, C, R, R], got {list(self.images.shape)}")
        if self.labels is not None:
            if self.labels.shape != (len(self.images),):
                raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")
            if self.class_names is None or int(self.labels.max()) >= len(self.class_names):
                raise ValueError("every label needs a class name")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def label_dim(self) -> int:
        return 0 if self.class_names is None else len(self.class_names)

    def one_hot(self, index: Tensor) -> Tensor | None:
        """One-hot class vectors [len(index), label_dim] of the given rows, or None."""
        if self.labels is None:
            return None
        return torch.eye(self.label_dim, dtype=torch.float32)[self.labels[index]]


def load_digits_dataset() -> ImageDataset:
    """scikit-learn's digits: values 0..16 -> v / 8 - 1, so ink is +1 and paper -1."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 8 - 1).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return ImageDataset(images, labels, [str(k) for k in range(10)], {
        "name": "sklearn.datasets.load_digits",
        "images": len(images),
        "resolution": 8,
        "channels": 1,
        "scaling": "x = v / 8 - 1 for v in 0..16",
        "sha256": hashlib.sha256(digits.images.astype(np.uint8).tobytes()).hexdigest(),
    })


def _read_labels(path: Path) -> dict[str, str]:
    if path.suffix.lower() == ".json":
        entries = json.loads(path.read_text(encoding="utf-8")).get("labels")
        if not isinstance(entries, list):
            raise ValueError(f"{path.name}: expected {{\"labels\": [[file, label], ...]}}")
        return {str(name): str(label) for name, label in entries}
    labels: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p for p in re.split(r"[,\s]+", line) if p]
        if len(parts) != 2:
            raise ValueError(f"{path.name}:{number}: expected 'FILE,LABEL', got {line!r}")
        labels[parts[0]] = parts[1]
    return labels


def load_png_folder(folder: str | Path, labels_file: str | Path | None = None) -> ImageDataset:
    """Every *.png in `folder` (sorted by name); labels from `labels_file`, or unconditional."""
    from PIL import Image

    folder = Path(folder)
    files = sorted(folder.glob("*.png"))
    if not files:
        raise ValueError(f"{folder}: no .png files")
    with Image.open(files[0]) as first:
        mode = "L" if first.mode in ("L", "LA", "I", "I;16", "1") else "RGB"
    arrays: list[np.ndarray] = []
    digest = hashlib.sha256()
    for file in files:
        with Image.open(file) as image:
            array = np.asarray(image.convert(mode))
        if array.shape[0] != array.shape[1] or (arrays and array.shape != arrays[0].shape):
            raise ValueError(f"{file.name}: size {array.shape[1]}x{array.shape[0]}; all images must be the same "
                             "square size")
        arrays.append(array)
        digest.update(file.name.encode() + array.tobytes())
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
    images = torch.from_numpy(stacked.astype(np.float32) / 127.5 - 1)

    labels: Tensor | None = None
    class_names: list[str] | None = None
    if labels_file is not None:
        mapping = _read_labels(Path(labels_file))
        missing = [f.name for f in files if f.name not in mapping]
        if missing:
            raise ValueError(f"{Path(labels_file).name}: no label for {len(missing)} image(s), e.g. {missing[:3]}")
        raw = [mapping[f.name] for f in files]
        if all(re.fullmatch(r"\d+", r) for r in raw):
            class_names = [str(k) for k in range(max(int(r) for r in raw) + 1)]
        else:
            class_names = sorted(set(raw))
        labels = torch.tensor([class_names.index(r) for r in raw], dtype=torch.int64)
    return ImageDataset(images, labels, class_names, {
        "name": f"png-folder:{folder.name}",
        "images": len(images),
        "resolution": int(images.shape[-1]),
        "channels": int(images.shape[1]),
        "labels_file": None if labels_file is None else Path(labels_file).name,
        "scaling": "x = v / 127.5 - 1 for v in 0..255",
        "sha256": digest.hexdigest(),
    })


def load_dataset(source: str, labels_file: str | None = None) -> ImageDataset:
    """'digits' (scikit-learn) or a folder of PNGs."""
    if source == "digits":
        if labels_file is not None:
            raise ValueError("--labels applies to a PNG folder, not to 'digits'")
        return load_digits_dataset()
    return load_png_folder(source, labels_file)
