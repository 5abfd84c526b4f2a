"""Sampler output -> pixels -> PNG bytes (numpy and Pillow only; no torch import)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin


def to_pixels(images: Any) -> np.ndarray:
    """uint8 [B, H, W, C] from images in [-1, 1] ([B, C, H, W] tensor or array).

    pixel = floor(clip(x * 127.5 + 128, 0, 255)), computed in the sampler's float64 as the
    reference does (casting a non-negative float to uint8 truncates, i.e. floors).
    """
    if hasattr(images, "detach"):  # a torch tensor (so torch is imported): same arithmetic
        import torch

        return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    array = np.asarray(images)
    return np.clip(array * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def encode_png(pixels: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes of one [H, W, C] uint8 image: grayscale for C = 1, RGB for C = 3.

    `text` becomes tEXt chunks (e.g. the generation metadata). Without it the bytes are what
    Pillow writes by default, the same as the reference's generate.py.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8 [H, W, 1|3] pixels, got {pixels.dtype} {pixels.shape}")
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG (the generation metadata the worker writes)."""
    with Image.open(io.BytesIO(data)) as image:
        return {str(k): str(v) for k, v in image.text.items()}  # type: ignore[attr-defined]


def decode_png(data: bytes) -> np.ndarray:
    """[H, W, C] uint8 pixels of PNG bytes."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array
