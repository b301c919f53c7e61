"""Encoded face images: format checks without decoding, and the one decoder every reader uses.

Decoding happens with OpenCV, in the pipeline's workers and in the tools' threads (OpenCV releases
the GIL), refusing images whose header declares more than MAX_IMAGE_PIXELS (src/__init__.py also
sets OpenCV's own limit). MindSpore's own decoder is not used: on a file it cannot decode it
writes `abnormal_image.jpg` into the current folder and reports no sample.
"""
import struct

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
IMAGE_SIZE = (112, 112)  # (height, width) of an aligned face
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_format(data):
    """'jpeg', 'png' or 'bmp' from the signature of encoded image bytes, else None."""
    head = bytes(data[:8])
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head == _PNG_SIGNATURE:
        return "png"
    if head[:2] == b"BM" and len(data) >= 26:
        return "bmp"
    return None


def image_extension(data):
    """File extension for encoded image bytes: '.jpg', '.png' or '.bmp' ('.jpg' if unknown)."""
    return {"png": ".png", "bmp": ".bmp"}.get(image_format(data), ".jpg")


def check_image_bytes(data):
    """Cheap completeness check without decoding: None if the bytes start with a JPEG/PNG/BMP
    signature and end the way that format ends, else the reason. Trailing zero bytes after a
    JPEG end marker are tolerated (some writers pad files)."""
    fmt = image_format(data)
    if fmt is None:
        head = " ".join(f"{b:02x}" for b in bytes(data[:4]))
        return f"not a JPEG/PNG/BMP image ({len(data)} bytes starting with {head or 'nothing'})"
    if fmt == "jpeg":
        if not bytes(data[-64:]).rstrip(b"\0").endswith(b"\xff\xd9"):
            return f"truncated JPEG: no end marker ({len(data)} bytes)"
    elif fmt == "png":
        if bytes(data[-8:-4]) != b"IEND":
            return f"truncated PNG: no IEND chunk at the end ({len(data)} bytes)"
    else:
        declared = struct.unpack_from("<I", bytes(data[:6]), 2)[0]
        if declared > len(data):
            return f"truncated BMP: header declares {declared} bytes, file has {len(data)}"
    return None


MAX_IMAGE_PIXELS = 1 << 25  # 33.5 M pixels, e.g. 5792 x 5792: far beyond any face crop


def image_dimensions(data):
    """(width, height) declared by a JPEG/PNG/BMP header, without decoding; None if not found."""
    data = bytes(data[:1 << 16]) if len(data) > 1 << 16 else bytes(data)
    fmt = image_format(data)
    if fmt == "png" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if fmt == "bmp" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    if fmt == "jpeg":
        pos = 2
        while pos + 9 <= len(data):
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                pos += 2
                continue
            length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
                return width, height
            pos += 2 + length
    return None


def decode_image(data):
    """Encoded bytes -> HxWx3 uint8 RGB array, or None if OpenCV cannot decode them (or they
    declare more pixels than the limit)."""
    if data is None or len(data) == 0:
        return None
    size = image_dimensions(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        return None
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if image is None or image.ndim != 3 or image.size == 0:
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def why_undecodable(data):
    """The reason an image could not be decoded, for messages."""
    return check_image_bytes(data) or "cannot be decoded (corrupt, or larger than the pixel limit)"


def resize(image, size=IMAGE_SIZE):
    """`image` at (height, width) `size`: area averaging to shrink, bilinear to enlarge."""
    h, w = image.shape[:2]
    if (h, w) == tuple(size):
        return image
    shrink = h > size[0] and w > size[1]
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

