"""Prompt -> PNG bytes: the built-in placeholder image generator.

It is pure (no I/O) and runs in a worker thread, so it may block. Real models and image APIs are
other generators behind the same interface (generators.py, providers/).
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import math
from collections.abc import Iterator
from functools import cache
from itertools import islice

from PIL import Image, ImageDraw, ImageFont

DEFAULT_SIZE = 512
LARGEST_FONT_PX = 48
SMALLEST_FONT_PX = 12
ELLIPSIS = "\u2026"

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def render_png(prompt: str, width: int = DEFAULT_SIZE, height: int | None = None) -> bytes:
    """Draw the prompt, wrapped, in white over a dark gradient whose colours are derived from it.

    The image is `width` x `height` pixels, square when `height` is not given.
    """
    height = height or width
    image = background(prompt, width, height)
    margin = min(width, height) // 16
    font, lines = fit_text(prompt, width - 2 * margin, height - 2 * margin)
    ImageDraw.Draw(image).multiline_text(
        (width // 2, height // 2),
        "\n".join(lines),
        font=font,
        fill="white",
        anchor="mm",
        align="center",
        spacing=line_height(font) - font.getbbox("A")[3],  # lines exactly line_height apart, as fitted
    )
    out = io.BytesIO()
    # Level 1 encodes several times faster than the default at nearly the same size for gradients.
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def background(prompt: str, width: int, height: int | None = None) -> Image.Image:
    """A smooth blend of four dark corner colours taken from the prompt's hash."""
    digest = hashlib.sha256(prompt.encode()).digest()
    corners = Image.new("RGB", (2, 2))
    corners.putdata([dark_colour(digest[i : i + 2]) for i in range(0, 8, 2)])
    size = (width, height or width)
    return corners.resize(size, Image.Resampling.BILINEAR, reducing_gap=None, box=(0.5, 0.5, 1.5, 1.5))


def dark_colour(seed: bytes) -> tuple[int, int, int]:
    # Dark enough everywhere that white text stays legible.
    red, green, blue = colorsys.hsv_to_rgb(seed[0] / 256, 0.5 + seed[1] / 512, 0.45)
    return round(red * 255), round(green * 255), round(blue * 255)


def fit_text(text: str, width: int, height: int | None = None) -> tuple[Font, list[str]]:
    """The largest font at which the wrapped text fits a width x height box (square if no height); cut
    short if none does."""
    height = height or width
    # Text of advance w at 1 px wraps into about w*px/width lines of 1.25*px each, so the text fills
    # the box near px = sqrt(width * height / (1.25 * w)): start there rather than at the largest size.
    reference = load_font(LARGEST_FONT_PX)
    advance_at_1px = sum(reference.getlength(line) for line in text.splitlines()) / LARGEST_FONT_PX
    estimate = int(math.sqrt(width * height / (1.25 * advance_at_1px))) + 1 if advance_at_1px else LARGEST_FONT_PX
    for px in range(max(SMALLEST_FONT_PX, min(LARGEST_FONT_PX, estimate)), SMALLEST_FONT_PX - 1, -1):
        font = load_font(px)
        max_lines = max(1, height // line_height(font))
        lines = list(islice(wrap(text, font, width), max_lines + 1))
        if len(lines) <= max_lines:
            return font, lines
    lines = lines[:max_lines]
    while lines[-1] and font.getlength(lines[-1] + ELLIPSIS) > width:
        lines[-1] = lines[-1][:-1]
    lines[-1] += ELLIPSIS
    return font, lines


def wrap(text: str, font: Font, width: int) -> Iterator[str]:
    """Greedy word wrap by rendered width; a word wider than a line is split between characters."""
    # Summing cached character advances skips kerning, a pixel or two that the margin absorbs,
    # and makes wrapping a 2,000-character prompt take a few FreeType calls instead of thousands.
    advance = cache(font.getlength)
    for paragraph in text.splitlines() or [""]:
        line, line_width = "", 0.0
        for word in paragraph.split():
            word_width = sum(map(advance, word))
            gap = advance(" ") if line else 0.0
            if line_width + gap + word_width <= width:
                line, line_width = line + " " * bool(line) + word, line_width + gap + word_width
                continue
            if line:
                yield line
            line, line_width = word, word_width
            while line_width > width and len(line) > 1:
                cut, cut_width = 1, advance(line[0])
                while cut_width + advance(line[cut]) <= width:
                    cut_width += advance(line[cut])
                    cut += 1
                yield line[:cut]
                line, line_width = line[cut:], line_width - cut_width
        yield line


def line_height(font: Font) -> int:
    return round(font.size * 1.25)


@cache
def load_font(px: int) -> Font:
    # DejaVu covers accented, Cyrillic and Greek text; Pillow's built-in font draws those as boxes.
    try:
        return ImageFont.truetype("DejaVuSans.ttf", px)
    except OSError:
        return ImageFont.load_default(size=px)
