"""Reading and writing face-verification ``.bin`` files (lfw, cfp_fp, agedb_30, calfw, cplfw).

A ``.bin`` file is a pickle of ``(images, issame)``: ``images`` is a list of 2N encoded images
(JPEG/PNG byte strings) and ``issame`` a list of N booleans; pair ``k`` is formed by the images
``2k`` and ``2k + 1``.  The published files were written by Python 2 and Python 3 pickle and
contain nothing but byte strings, lists/tuples, booleans and occasionally numpy booleans or
numpy bool arrays.

Pickle can run arbitrary code, so these files are read with a restricted unpickler that only
resolves the handful of numpy/builtin names such files need and rejects everything else before
anything is called.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from src.data.images import decode_image, resize, why_undecodable
from src.errors import ArcFaceError

__all__ = ["load_bin", "save_bin", "SafeBinUnpickler"]


# The callables numpy pickles refer to, taken from numpy's own reduce values so that the
# (deprecated in numpy 2) ``numpy.core`` import path is never needed here.
_NP_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_NP_SCALAR = np.bool_(True).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol-5 arrays


def _safe_dtype(*args):
    """``numpy.dtype`` as called by pickle, refusing object dtypes."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object dtypes are not allowed in a verification file")
    return dtype


def _safe_frombuffer(buf, dtype, shape, order):
    """numpy's protocol-5 array constructor, for plain (non-object) dtypes only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("object dtypes are not allowed in a verification file")
    return _NP_FROMBUFFER(buf, dtype, shape, order)


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as used by Python 3 protocol-2 pickles of ``bytes``: latin-1 only."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in (
        "latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"
    ):
        raise pickle.UnpicklingError("only latin-1 byte-string encoding is allowed")
    return text.encode("latin1")


_ALLOWED = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _NP_RECONSTRUCT
    _ALLOWED[(_mod, "scalar")] = _NP_SCALAR
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _safe_frombuffer
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = _safe_dtype
_ALLOWED[("_codecs", "encode")] = _latin1_encode
_ALLOWED[("builtins", "bytearray")] = bytearray
_ALLOWED[("__builtin__", "bytearray")] = bytearray
del _mod


class _ForbiddenGlobal(Exception):
    """Raised by the unpickler for a name outside the allow-list."""


class SafeBinUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the names a verification ``.bin`` can legitimately contain."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def _image_bytes(item):
    """The encoded bytes of one pickled image entry, or None if the entry has the wrong type."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return item
    if isinstance(item, str):  # a byte string that went through a text round trip
        try:
            return item.encode("latin1")
        except UnicodeEncodeError:
            return None
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item
    return None


def _as_issame(path, issame):
    """Validate the issame entry and return it as a bool array."""
    if isinstance(issame, np.ndarray):
        if issame.ndim != 1 or issame.dtype.kind not in "biu":
            raise ArcFaceError(
                f"{path}: the issame list must be a 1-D boolean array, "
                f"got dtype {issame.dtype} with shape {issame.shape}"
            )
        values = list(issame.tolist())
    elif isinstance(issame, (list, tuple)):
        values = list(issame)
    else:
        raise ArcFaceError(
            f"{path}: the second element must be the list of issame flags, "
            f"got {type(issame).__name__}"
        )
    out = np.empty(len(values), dtype=bool)
    for k, value in enumerate(values):
        if isinstance(value, (bool, np.bool_)):
            out[k] = bool(value)
        elif isinstance(value, (int, np.integer)) and int(value) in (0, 1):
            out[k] = bool(value)
        else:
            raise ArcFaceError(f"{path}: issame flag {k} is not a boolean ({value!r})")
    return out


def _normalise_size(image_size):
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    height, width = (int(v) for v in image_size)
    if height <= 0 or width <= 0:
        raise ArcFaceError(f"image size must be positive, got {tuple(image_size)}")
    return height, width


def _read_pickle(path):
    if not os.path.isfile(path):
        raise ArcFaceError(f"{path}: verification file not found")
    try:
        with open(path, "rb") as f:
            return SafeBinUnpickler(f, encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise ArcFaceError(
            f"{path}: refusing to load, the pickle references '{exc}' "
            "which a verification file never contains"
        ) from None
    except OSError as exc:
        raise ArcFaceError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    except Exception as exc:  # truncated or garbage data surfaces as many exception types
        raise ArcFaceError(
            f"{path}: not a valid verification .bin file (pickle): "
            f"{type(exc).__name__}: {exc}"
        ) from None


def load_bin(path, image_size=(112, 112), progress=False):
    """Load a verification ``.bin``.

    Args:
        path: the ``.bin`` file.
        image_size: ``(height, width)`` (or one int) the images are resized to when they differ.
        progress: show a tqdm progress bar while decoding.

    Returns:
        ``(images, issame)``: a uint8 array ``(2N, H, W, 3)`` in RGB order and a bool array
        ``(N,)``.

    Raises:
        ArcFaceError: missing, unreadable, truncated or malicious file, wrong structure, image
        count not matching the pairs, or an image that cannot be decoded (its index is named).
    """
    path = os.fspath(path)
    height, width = _normalise_size(image_size)
    data = _read_pickle(path)

    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ArcFaceError(
            f"{path}: expected a pickled pair (images, issame), got {type(data).__name__}"
            + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else "")
        )
    images, issame = data
    if not isinstance(images, (list, tuple)):
        raise ArcFaceError(
            f"{path}: the first element must be the list of encoded images, "
            f"got {type(images).__name__}"
        )
    issame = _as_issame(path, issame)
    if len(images) % 2 != 0:
        raise ArcFaceError(f"{path}: odd number of images ({len(images)}), images come in pairs")
    if len(images) != 2 * len(issame):
        raise ArcFaceError(
            f"{path}: {len(images)} images but {len(issame)} issame flags "
            f"(expected {2 * len(issame)} images)"
        )

    out = np.empty((len(images), height, width, 3), dtype=np.uint8)
    indices = range(len(images))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"loading {os.path.basename(path)}", unit="img")
    for i in indices:
        buf = _image_bytes(images[i])
        if buf is None:
            raise ArcFaceError(
                f"{path}: image {i} is not an encoded byte string ({type(images[i]).__name__})"
            )
        img = decode_image(buf)
        if img is None:
            raise ArcFaceError(f"{path}: image {i} could not be decoded ({why_undecodable(buf)})")
        out[i] = resize(img, (height, width))
    return out, issame


def save_bin(path, images_bytes_list, issame_list):
    """Write a verification ``.bin`` in the published format (pickle protocol 4).

    ``images_bytes_list`` holds 2N encoded images (bytes-like), ``issame_list`` N booleans.
    """
    path = os.fspath(path)
    images = []
    for i, item in enumerate(images_bytes_list):
        if not isinstance(item, (bytes, bytearray, memoryview, np.ndarray)):
            raise ArcFaceError(f"{path}: image {i} to save is not bytes ({type(item).__name__})")
        images.append(bytes(item) if not isinstance(item, np.ndarray) else item.tobytes())
    issame = [bool(v) for v in issame_list]
    if len(images) != 2 * len(issame):
        raise ArcFaceError(
            f"{path}: {len(images)} images but {len(issame)} issame flags "
            f"(expected {2 * len(issame)} images)"
        )
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump((images, issame), f, protocol=4)
    os.replace(tmp, path)
