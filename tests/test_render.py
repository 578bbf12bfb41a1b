"""render.py: prompt -> PNG bytes, wrapped white text over a dark background derived from the prompt."""

from __future__ import annotations

import io
import random
from typing import cast

import pytest
from PIL import Image, ImageChops

import render

# Seeded, so the prompt (and therefore the picture) is the same on every run.
_random = random.Random(7)
FOUR_HUNDRED_WORDS = " ".join(
    "".join(_random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_random.randint(2, 9))) for _ in range(400)
)
NO_SPACES = "a" * 2000
# Fits at SMALLEST_FONT_PX (26 of 29 lines) but not at 13 px: the size search must reach 12.
FITS_ONLY_AT_SMALLEST_SIZE = ("word " * 400)[:1682]
WRAP_CASES = [
    pytest.param(FOUR_HUNDRED_WORDS, 448, id="400-words"),
    pytest.param(NO_SPACES, 448, id="2000-chars-no-spaces"),
    pytest.param("a lighthouse at dusk", 448, id="short"),
    pytest.param("Съешь же ещё этих мягких булок " * 20, 224, id="cyrillic-narrow"),
    pytest.param("x" * 300, 224, id="no-spaces-narrow"),
]


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def changed_pixels(prompt: str, size: int) -> int:
    difference = ImageChops.difference(decode(render.render_png(prompt, size)), render.background(prompt, size))
    return sum(difference.convert("L").point(lambda value: 255 if value else 0).histogram()[1:])


# ---------------------------------------------------------------- the PNG


@pytest.mark.parametrize("size", [render.DEFAULT_SIZE, 256, 100])
def test_is_a_png_of_the_requested_size(size: int) -> None:
    image = decode(render.render_png("a lighthouse at dusk", size))
    assert (image.format, image.size) == ("PNG", (size, size))


@pytest.mark.parametrize(("width", "height"), [(1024, 256), (200, 800), (64, 4096)])
def test_is_a_png_of_the_requested_width_and_height(width: int, height: int) -> None:
    image = decode(render.render_png("a lighthouse at dusk", width, height))
    assert (image.format, image.size) == ("PNG", (width, height))


def test_default_size_is_512() -> None:
    assert decode(render.render_png("a lighthouse at dusk")).size == (512, 512)


def test_is_rgb() -> None:
    assert decode(render.render_png("a lighthouse at dusk")).mode == "RGB"


def test_passes_pillow_verification() -> None:
    # verify() checks the chunk CRCs, which a truncated or mangled PNG fails.
    Image.open(io.BytesIO(render.render_png("a lighthouse at dusk"))).verify()


# ---------------------------------------------------------------- colours


@pytest.mark.parametrize("prompt", ["a cat", "", FOUR_HUNDRED_WORDS, "Привет 你好 🎨"])
def test_same_prompt_gives_identical_bytes(prompt: str) -> None:
    assert render.render_png(prompt) == render.render_png(prompt)


@pytest.mark.parametrize(("first", "second"), [("a cat", "a dog"), ("a", "b"), ("hello", "hello ")])
def test_different_prompts_get_different_colours(first: str, second: str) -> None:
    def corners(prompt: str) -> list[object]:
        image = render.background(prompt, 64)
        return [image.getpixel(xy) for xy in [(0, 0), (63, 0), (0, 63), (63, 63)]]

    assert corners(first) != corners(second)


@pytest.mark.parametrize("prompt", ["a cat", "a dog", "", "sunrise", "🎨", FOUR_HUNDRED_WORDS])
def test_background_is_dark_enough_for_white_text(prompt: str) -> None:
    # dark_colour caps HSV value at 0.45, and a bilinear blend never exceeds its brightest corner.
    extrema = cast(tuple[tuple[int, int], ...], render.background(prompt, 128).getextrema())
    brightest = max(high for _, high in extrema)
    assert brightest <= round(0.45 * 255)


# ---------------------------------------------------------------- the text


@pytest.mark.parametrize(("prompt", "size"), [("a cat", 512), ("a cat", 256), (FOUR_HUNDRED_WORDS, 512)])
def test_text_is_drawn_over_the_background(prompt: str, size: int) -> None:
    assert changed_pixels(prompt, size) > size * size // 200


@pytest.mark.parametrize("prompt", ["a cat", FOUR_HUNDRED_WORDS])
def test_text_only_lightens_the_background(prompt: str) -> None:
    # Anti-aliased white text blends each pixel towards white: no channel may get darker.
    rendered = decode(render.render_png(prompt))
    assert ImageChops.subtract(render.background(prompt, 512), rendered).getbbox() is None


@pytest.mark.parametrize("prompt", ["a cat", "Привет", FOUR_HUNDRED_WORDS])
def test_glyphs_are_solid_white(prompt: str) -> None:
    colours = {colour: count for count, colour in decode(render.render_png(prompt)).getcolors(512 * 512) or []}
    assert colours.get((255, 255, 255), 0) > 100


# ---------------------------------------------------------------- wrapping


@pytest.mark.parametrize(("text", "width"), WRAP_CASES)
def test_every_line_fits_the_width(text: str, width: int) -> None:
    font, lines = render.fit_text(text, width)
    # Wrapping sums advances without kerning, so a measured line may be a pixel or two wider.
    assert max(font.getlength(line) for line in lines) <= width + 2


@pytest.mark.parametrize(("text", "width"), WRAP_CASES)
def test_lines_fit_the_height(text: str, width: int) -> None:
    font, lines = render.fit_text(text, width)
    assert len(lines) * render.line_height(font) <= width


@pytest.mark.parametrize(("width", "height"), [(896, 192), (168, 704)], ids=["wide", "tall"])
@pytest.mark.parametrize("text", [FOUR_HUNDRED_WORDS, "a lighthouse at dusk over a stormy sea " * 5])
def test_text_fits_a_box_that_is_not_square(text: str, width: int, height: int) -> None:
    font, lines = render.fit_text(text, width, height)
    assert max(font.getlength(line) for line in lines) <= width + 2
    assert len(lines) * render.line_height(font) <= height


@pytest.mark.parametrize("text", ["a lighthouse at dusk", "Съешь же ещё этих мягких булок " * 10, "x" * 300])
def test_text_that_fits_keeps_every_character_in_order(text: str) -> None:
    _, lines = render.fit_text(text, 448)
    assert "".join("".join(lines).split()) == "".join(text.split())


@pytest.mark.parametrize("text", [FOUR_HUNDRED_WORDS, NO_SPACES])
def test_text_too_long_for_the_smallest_size_ends_with_an_ellipsis(text: str) -> None:
    _, lines = render.fit_text(text, 448)
    assert lines[-1].endswith(render.ELLIPSIS)


@pytest.mark.parametrize(
    "text",
    [
        "a lighthouse at dusk",
        "x" * 300,
        pytest.param(FITS_ONLY_AT_SMALLEST_SIZE, id="fits-only-at-12-px"),
    ],
)
def test_text_that_fits_is_not_cut(text: str) -> None:
    _, lines = render.fit_text(text, 448)
    assert not lines[-1].endswith(render.ELLIPSIS)


@pytest.mark.parametrize(
    ("prompt", "size"),
    [
        (NO_SPACES, 512),
        (FOUR_HUNDRED_WORDS, 512),
        pytest.param("W" * 2000, 512, id="2000-wide-letters"),
        pytest.param("😀" * 2000, 512, id="2000-emoji"),
        pytest.param(NO_SPACES, 256, id="no-spaces-at-256"),
    ],
)
def test_longest_prompts_render(prompt: str, size: int) -> None:
    assert decode(render.render_png(prompt, size)).size == (size, size)


# ---------------------------------------------------------------- odd input


@pytest.mark.parametrize(
    "prompt",
    [
        pytest.param("café crème brûlée", id="accents"),
        pytest.param("Привет, мир", id="cyrillic"),
        pytest.param("你好，世界", id="cjk"),
        pytest.param("🎨🖌️ 👨‍👩‍👧 paint", id="emoji"),
        pytest.param("مرحبا بالعالم", id="arabic"),
        pytest.param("x\u0301\u0301\u0301\u0301", id="stacked-combining-marks"),
        pytest.param("col\tumns\tof\ttext", id="tabs"),
        pytest.param("nul\x00 bell\x07 esc\x1b[31m del\x7f", id="control-chars"),
        pytest.param("\u202eevil\u202c and \u2066isolate\u2069", id="bidi-override"),
        pytest.param("\u200b\u200d\ufeff", id="zero-width"),
        pytest.param(" \t  ", id="whitespace-only"),
        pytest.param("", id="empty"),
        pytest.param("line one\nline two", id="newline"),
        pytest.param("one\r\ntwo\rthree", id="carriage-returns"),
        pytest.param("a\n\n\nb", id="blank-lines"),
        pytest.param("  \t\n ", id="whitespace-with-newline"),
    ],
)
def test_odd_input_renders(prompt: str) -> None:
    assert decode(render.render_png(prompt)).size == (512, 512)
