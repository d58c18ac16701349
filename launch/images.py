"""The first frame of an image-to-video request: a PNG or JPEG file in base64, read within size
caps before any pixel is decoded (a small file may claim a huge image)."""

from __future__ import annotations

import base64
import binascii
import io

IMAGE_FORMATS = ("PNG", "JPEG")
MAX_IMAGE_BYTES = 8 << 20
MAX_IMAGE_SIDE = 4096


def decode_image(text: str):
    """The RGB Pillow image of a request's ``image``; ``ValueError`` saying why it is not a PNG or
    JPEG file in base64 within the size caps. Whitespace is ignored (``base64`` wraps its lines)."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"is not valid base64 ({error})") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"is a file of {len(data)} bytes, more than the {MAX_IMAGE_BYTES} an image may have")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise ValueError(f"is not a {' or '.join(IMAGE_FORMATS)} image ({len(data)} bytes)") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"is too large an image ({error})") from None
    width, height = image.size
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ValueError(f"is {width}x{height} pixels, more than {MAX_IMAGE_SIDE} on a side")
    try:
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:   # Pillow's errors for damaged image data
        raise ValueError(f"is a damaged {image.format} image ({error})") from None
