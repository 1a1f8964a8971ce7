from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import dhash, load_rgb, probe_image
from tests.support.images import noise_image

MAX_PIXELS = 89_478_485


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    ("mode", "fmt", "suffix"),
    [
        ("L", "PNG", ".png"),
        ("CMYK", "JPEG", ".jpg"),
        ("P", "PNG", ".png"),
        ("RGBA", "PNG", ".png"),
        ("1", "PNG", ".png"),
        ("LA", "PNG", ".png"),
        ("RGB", "WEBP", ".webp"),
        ("RGB", "BMP", ".bmp"),
    ],
)
def test_unusual_modes_load_as_rgb(tmp_path, mode, fmt, suffix):
    path = _save(noise_image(1, mode=mode), tmp_path / f"img{suffix}", format=fmt)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (32, 24)
    info = probe_image(path, MAX_PIXELS)
    assert info.decodable and info.reason is None and info.format == fmt and info.mode == mode


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 10, 20))
    img = load_rgb(_save(rgba, tmp_path / "a.png"))
    assert img.getpixel((15, 5)) == (255, 255, 255)
    assert img.getpixel((5, 5)) == (0, 0, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]] * 16, dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "deep.png")  # uint16 → mode I;16
    pixels = np.asarray(load_rgb(path))[0, :, 0]
    assert pixels.tolist() == [0, 128, 255]
    assert probe_image(path, MAX_PIXELS).decodable


def test_exif_orientation_is_applied(tmp_path):
    img = noise_image(3, size=(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = _save(img, tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_rgb(path).size == (20, 40)
    info = probe_image(path, MAX_PIXELS)
    assert info.exif_orientation == 6 and (info.width, info.height) == (40, 20)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"just some text\n", "not an image")],
)
def test_non_images_are_not_decodable(tmp_path, content, reason):
    path = tmp_path / "tmp"
    path.write_bytes(content)
    info = probe_image(path, MAX_PIXELS)
    assert not info.decodable and info.reason == reason and info.phash is None


def test_truncated_jpeg_is_not_decodable(tmp_path):
    buf = io.BytesIO()
    noise_image(4, size=(64, 64)).save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    info = probe_image(path, MAX_PIXELS)
    assert not info.decodable and info.reason.startswith("truncated image")
    with pytest.raises(OSError):
        load_rgb(path)


def test_decompression_bomb_is_rejected_from_the_header(tmp_path):
    path = _save(Image.new("1", (5000, 5000)), tmp_path / "bomb.png")  # tiny file, 25 MP
    info = probe_image(path, max_pixels=1_000_000)
    assert not info.decodable and "decompression bomb" in info.reason and info.width == 5000


def _blocky(seed: int) -> Image.Image:
    """9x8 grey levels whose horizontal neighbours differ by 80: robust to resampling."""
    rng = np.random.default_rng(seed)
    steps = rng.choice([-80, 80], size=(8, 8))
    rows = np.concatenate([np.zeros((8, 1)), steps.cumsum(axis=1)], axis=1)
    rows = rows - rows.min(axis=1, keepdims=True) + 10
    return Image.fromarray(rows.clip(0, 255).astype(np.uint8), "L").convert("RGB")


def test_dhash_is_stable_under_resize_and_differs_between_images():
    a, b = _blocky(5), _blocky(6)
    big = a.resize((180, 160), Image.Resampling.NEAREST)
    assert dhash(big) == dhash(a) == dhash(big.resize((90, 80), Image.Resampling.NEAREST))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    assert dhash(Image.open(buf)) == dhash(a)
    assert dhash(a) != dhash(b)
