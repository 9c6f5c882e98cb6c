"""Sample grids as PNG files (PIL when installed, else a minimal zlib writer)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def image_grid(images: np.ndarray, columns: int = 10, pad: int = 2) -> np.ndarray:
  """[N, H, W] (or [N,1,H,W]) floats in [0,1] -> one uint8 [rows*(H+pad)+pad, ...] grid."""
  images = np.asarray(images)
  if images.ndim == 4:
    images = images[:, 0]
  n, h, w = images.shape
  rows = -(-n // columns)
  grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad), np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = (
      np.clip(image, 0, 1) * 255).round().astype(np.uint8)
  return grid


def write_png(path, gray: np.ndarray) -> None:
  """Write a uint8 [H, W] grayscale PNG (PIL when installed, else zlib + struct)."""
  gray = np.ascontiguousarray(gray, np.uint8)
  if gray.ndim != 2:
    raise ValueError(f"gray must be a [H, W] uint8 image, got shape {gray.shape}")
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  try:
    from PIL import Image
  except ImportError:
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
      return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w = gray.shape
    raw = b"".join(b"\x00" + gray[row].tobytes() for row in range(h))  # filter type 0 per row
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)
    return
  Image.fromarray(gray, mode="L").save(path)
