"""Image hashes for deduplication without a model: exact (the decoded pixels) and perceptual (pHash).

* ``pixel_hash``: SHA-1 of the decoded RGB pixels and size. Equal for byte-identical files and for the same
  picture stored twice losslessly (PNG vs. a lossless re-encode); any pixel change gives another hash.
* ``phash``: the DCT perceptual hash (Zauner 2010, *Implementation and Benchmarking of Perceptual Image Hash
  Functions*), computed as the ``imagehash`` package's ``phash``: grey, resized to 32 x 32 (Lanczos), 2-D
  DCT-II, the 8 x 8 lowest frequencies, each bit = coefficient > their median. Re-encoded JPEGs and resized
  copies land within a few bits of the original (Hamming distance); different pictures differ in about half
  of the 64 bits. Note the DC term is part of the block, as in ``imagehash``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.fft
from PIL import Image

PHASH_BITS = 64


def pixel_hash(image: Image.Image) -> str:
    """Hex SHA-1 of the RGB pixels (with the size, so a transposed picture differs)."""
    rgb = image.convert("RGB")
    digest = hashlib.sha1(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def phash(image: Image.Image, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """64-bit perceptual hash as an unsigned int, bit ``i`` = coefficient ``i`` (row-major) of the 8 x 8 block."""
    side = hash_size * highfreq_factor
    grey = np.asarray(image.convert("L").resize((side, side), Image.Resampling.LANCZOS), dtype=np.float64)
    dct = scipy.fft.dct(scipy.fft.dct(grey, axis=0), axis=1)  # (32, 32), unnormalised DCT-II as imagehash
    low = dct[:hash_size, :hash_size]
    bits = (low > np.median(low)).ravel()  # (64,)
    return int(np.packbits(bits, bitorder="little").view("<u8")[0])


def phash_hex(image: Image.Image) -> str:
    return f"{phash(image):016x}"


def hex_to_bits(hashes: list[str]) -> np.ndarray:
    """``phash_hex`` strings -> (N, 64) uint8 bits (bit ``i`` as ``phash`` numbers them)."""
    values = np.array([int(h, 16) for h in hashes], dtype="<u8")  # (N,)
    return np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
