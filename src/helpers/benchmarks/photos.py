"""A real photograph standing in for drawn images wherever their content matters: PNG size and encoding time.

Random-weight pipelines draw noise, whose PNG is about twice the size of a real 512-px picture's, and blurred noise
is about a third smaller. The stand-in is the 512 × 600 portrait matplotlib ships as sample data
(`grace_hopper.jpg`); every image is a different square crop of it, some mirrored, resized to the side asked for.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter, ImageOps

SOURCE = "matplotlib sample data: grace_hopper.jpg (a 512 × 600 photograph)"


def photo_crops(side: int, count: int) -> list[Image.Image]:
    """`count` distinct RGB `side`-px squares cut from the sample photograph (every other one mirrored)."""
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as source:
        photo = source.convert("RGB")
    width, height = photo.size
    room = height - width  # the vertical offsets a full-width square can take
    crops = []
    for i in range(count):
        top = (i // 2) * room // max(1, (count - 1) // 2) if count > 1 else 0
        square = photo.crop((0, top, width, top + width))
        if i % 2:
            square = ImageOps.mirror(square)
        crops.append(square if side == width else square.resize((side, side), Image.Resampling.LANCZOS))
    return crops


def picture_like(side: int, count: int) -> tuple[list[Image.Image], str]:
    """`photo_crops`, and what they are; where matplotlib, which ships the photograph, is not installed (a bare GPU
    machine), blurred noise instead, whose PNG is about a third smaller."""
    try:
        return photo_crops(side, count), SOURCE
    except ImportError:
        return ([image.filter(ImageFilter.GaussianBlur(3)) for image in noise_images(side, count)],
                "blurred random noise (matplotlib, which ships the sample photograph, is not installed)")


def noise_images(side: int, count: int) -> list[Image.Image]:
    """`count` RGB `side`-px images of uniform random noise, seed 0: what random-weight pipelines draw."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def png_bytes(image: Image.Image, level: int) -> int:
    """The size of `image` as a PNG at zlib `level`, in bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="png", compress_level=level)
    return buffer.tell()
