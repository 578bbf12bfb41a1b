"""What a remote generator sends back is checked before it is stored: a PNG, JPEG or WebP image that
Pillow decodes whole, within a byte bound and a pixel bound. Blocking: run it in a worker thread."""

from __future__ import annotations

import io

from PIL import Image

MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# The largest image a caller may ask for (4096x4096). Pillow's own bound, Image.MAX_IMAGE_PIXELS, is a
# setting of the whole process and lets through 89 M pixels: 358 MB for one RGBA decode.
MAX_IMAGE_PIXELS = 4096 * 4096


class ImageRejected(Exception):
    """Bytes the service will not store; the message completes "image generator sent ..."."""


def image_media_type(data: bytes | bytearray, max_bytes: int) -> str:
    """The media type of `data`, or ImageRejected."""
    if len(data) > max_bytes:
        raise ImageRejected(f"an image over {max_bytes} bytes")
    too_many_pixels = ImageRejected(f"an image of more than {MAX_IMAGE_PIXELS} pixels")
    try:
        # Only these decoders are tried; the header (read by open) gives the size before any decoding.
        with Image.open(io.BytesIO(data), formats=list(MEDIA_TYPES)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise too_many_pixels
            image.load()
            return MEDIA_TYPES[image.format or ""]
    except ImageRejected:
        raise
    except Image.DecompressionBombError:  # open() refuses twice Pillow's own bound before we can
        raise too_many_pixels from None
    except Exception as error:  # Pillow's decoders fail malformed input with OSError, SyntaxError, ValueError...
        raise ImageRejected("something that is not a PNG, JPEG or WebP image") from error
