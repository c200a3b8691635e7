"""Every image mode Pillow reads from the data folder's formats (PNG, JPEG, WebP) loads as the same 8-bit RGB.

A grey ramp is written in each mode and format; load_image must give back the ramp (16-bit values scaled, not
clipped at 255), with transparency composited on white.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.data import load_image, to_rgb

SIZE = 8
RAMP = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 4).astype(np.uint8)  # 0..252, (H, W)
HALF = 128  # an alpha of about one half


def rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[None], 3, axis=0)  # (3, H, W)


def on_white(grey: np.ndarray, alpha: int) -> np.ndarray:
    return np.rint(grey * (alpha / 255) + 255 * (1 - alpha / 255))


def write_png16(path: Path, a: np.ndarray) -> None:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the last axis), written by hand: Pillow writes 16 bits
    only for grey."""
    a = np.asarray(a, dtype=">u2")
    channels = 1 if a.ndim == 2 else a.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + row.tobytes() for row in a)  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def grey_palette() -> Image.Image:
    im = Image.fromarray(RAMP // 4, "L").convert("P")
    im.putpalette([v for i in range(256) for v in (4 * i % 256,) * 3])
    return im


def saved(tmp_path: Path, im: Image.Image, fmt: str, **kw) -> Path:
    path = tmp_path / f"img.{fmt.lower()}"
    im.save(path, fmt, **kw)
    return path


# (id, make the file from tmp_path, expected (3, H, W), tolerance)
def _p_transparent(tmp_path):
    im = grey_palette()
    im.info["transparency"] = 0  # palette index 0 (the ramp's first pixel) is transparent
    return saved(tmp_path, im, "PNG", transparency=0)


def _expected_p_transparent():
    e = RAMP.astype(float).copy()
    e[0, 0] = 255
    return rgb(e)


def _rgba_hole():
    a = np.full((SIZE, SIZE), 255, np.uint8)
    a[0, 1] = 0
    return Image.fromarray(np.dstack([RAMP] * 3 + [a]), "RGBA")


def _expected_hole():
    e = RAMP.astype(float).copy()
    e[0, 1] = 255
    return rgb(e)


FILES = [
    ("png-1", lambda t: saved(t, Image.fromarray(RAMP >= 128), "PNG"), rgb(255.0 * (RAMP >= 128)), 0),
    ("png-L", lambda t: saved(t, Image.fromarray(RAMP, "L"), "PNG"), rgb(RAMP), 0),
    ("png-LA", lambda t: saved(t, Image.fromarray(np.dstack([RAMP, np.full_like(RAMP, HALF)]), "LA"), "PNG"),
     rgb(on_white(RAMP, HALF)), 1),
    ("png-P", lambda t: saved(t, grey_palette(), "PNG"), rgb(RAMP), 0),
    ("png-P-transparency", _p_transparent, _expected_p_transparent(), 0),
    ("png-RGB", lambda t: saved(t, Image.fromarray(np.dstack([RAMP] * 3), "RGB"), "PNG"), rgb(RAMP), 0),
    ("png-RGBA", lambda t: saved(t, _rgba_hole(), "PNG"), _expected_hole(), 0),
    ("png-I;16", lambda t: saved(t, Image.fromarray(RAMP.astype(np.uint16) * 257), "PNG"), rgb(RAMP), 0),
    ("png16-grey", lambda t: (write_png16(t / "g.png", RAMP.astype(np.uint16) * 257), t / "g.png")[1], rgb(RAMP), 0),
    ("png16-grey-alpha", lambda t: (write_png16(t / "ga.png", np.dstack([RAMP.astype(np.uint16) * 257,
                                                                          np.full(RAMP.shape, HALF * 257)])),
                                    t / "ga.png")[1], rgb(on_white(RAMP, HALF)), 1),
    ("png16-RGB", lambda t: (write_png16(t / "c.png", np.dstack([RAMP.astype(np.uint16) * 257] * 3)), t / "c.png")[1],
     rgb(RAMP), 0),
    ("png16-RGBA", lambda t: (write_png16(t / "ca.png", np.dstack([RAMP.astype(np.uint16) * 257] * 3
                                                                   + [np.full(RAMP.shape, 65535)])),
                              t / "ca.png")[1], rgb(RAMP), 0),
    ("jpeg-L", lambda t: saved(t, Image.fromarray(RAMP, "L"), "JPEG", quality=100), rgb(RAMP), 3),
    ("jpeg-RGB", lambda t: saved(t, Image.fromarray(np.dstack([RAMP] * 3), "RGB"), "JPEG", quality=100), rgb(RAMP), 3),
    ("jpeg-CMYK", lambda t: saved(t, Image.fromarray(np.dstack([RAMP] * 3), "RGB").convert("CMYK"), "JPEG",
                                  quality=100), rgb(RAMP), 3),
    ("webp-RGB", lambda t: saved(t, Image.fromarray(np.dstack([RAMP] * 3), "RGB"), "WEBP", lossless=True),
     rgb(RAMP), 0),
    ("webp-RGBA", lambda t: saved(t, _rgba_hole(), "WEBP", lossless=True, exact=True), _expected_hole(), 0),
]


@pytest.mark.parametrize("make,expected,tol", [f[1:] for f in FILES], ids=[f[0] for f in FILES])
def test_every_file_mode_loads_as_the_same_rgb(tmp_path, make, expected, tol):
    x = load_image(make(tmp_path), SIZE)
    assert x.dtype == np.uint8 and x.shape == (3, SIZE, SIZE)
    assert np.abs(x.astype(float) - expected).max() <= tol


def _ramp_rgba(alpha: int) -> Image.Image:
    return Image.fromarray(np.dstack([RAMP] * 3 + [np.full_like(RAMP, alpha)]), "RGBA")


# Modes Pillow makes in memory (decoders and plugins hand them over): each must come out the same way.
MEMORY = [
    ("RGBa", lambda: _ramp_rgba(HALF).convert("RGBa"), rgb(on_white(RAMP, HALF)), 2),
    ("La", lambda: Image.fromarray(np.dstack([RAMP, np.full_like(RAMP, HALF)]), "LA").convert("La"),
     rgb(on_white(RAMP, HALF)), 2),
    ("PA", lambda: _ramp_rgba(255).convert("PA"), rgb(RAMP), 0),
    ("RGBX", lambda: Image.fromarray(np.dstack([RAMP] * 3), "RGB").convert("RGBX"), rgb(RAMP), 0),
    ("YCbCr", lambda: Image.fromarray(np.dstack([RAMP] * 3), "RGB").convert("YCbCr"), rgb(RAMP), 2),
    ("HSV", lambda: Image.fromarray(np.dstack([RAMP] * 3), "RGB").convert("HSV"), rgb(RAMP), 2),
    ("I;16B", lambda: Image.frombytes("I;16B", (SIZE, SIZE), (RAMP.astype(">u2") * 257).tobytes()), rgb(RAMP), 0),
    ("I", lambda: Image.fromarray(RAMP.astype(np.int32) * 257), rgb(RAMP), 0),
]


@pytest.mark.parametrize("make,expected,tol", [m[1:] for m in MEMORY], ids=[m[0] for m in MEMORY])
def test_every_memory_mode_converts_to_the_same_rgb(make, expected, tol):
    im = make()
    x = np.asarray(to_rgb(im)).transpose(2, 0, 1)
    assert np.abs(x.astype(float) - expected).max() <= tol, im.mode
