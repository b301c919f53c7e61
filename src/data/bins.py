"""Reading and writing face-verification ``.bin`` files (lfw, cfp_fp, agedb_30, calfw, cplfw).

A ``.bin`` file is a pickle of ``(images, issame)``: ``images`` is a list of 2N encoded images
(JPEG/PNG byte strings) and ``issame`` a list of N booleans; pair ``k`` is formed by the images
``2k`` and ``2k + 1``.  The published files were written by Python 2 and Python 3 pickle and
contain nothing but byte strings, lists/tuples, booleans and occasionally numpy booleans or
numpy bool arrays.

Pickle can run arbitrary code, and even numpy's own unpickling functions write outside an array
when given a crafted dtype state, so the files are read with `src.safe_pickle`: the handful of
numpy/builtin names such files need map to the placeholders below, which only keep checked plain
values, and every other name is refused. After loading, `_real` builds the arrays and scalars
itself from plain bytes, with a bool or integer dtype; numpy never sees the pickle.
"""

from __future__ import annotations

import math
import os
import pickle

import numpy as np

from src.data.images import decode_image, resize, why_undecodable
from src.errors import ArcFaceError
from src.files import atomic_write
from src.safe_pickle import Global, Placeholder, RefusedPickle, describe
from src.safe_pickle import load as safe_load

__all__ = ["load_bin", "save_bin"]

# numpy's dtype codes for bool and the integers: no floats, strings, void, fields or objects.
_DTYPE_CODES = frozenset({"b1", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8"})
_MAX_DIMS = 32
_MAX_ELEMENTS = 1 << 31
_LATIN1_NAMES = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"})


def _text(value, what):
    """A str from a str or, in a Python 2 pickle (read with encoding="bytes"), an ASCII byte string."""
    if type(value) is str:
        return value
    if type(value) is bytes and value.isascii():
        return value.decode("ascii")
    raise RefusedPickle(f"{what} must be a string, got {describe(value)}")


class _DType(Placeholder):
    """``numpy.dtype(code, align, copy)`` plus its BUILD state, kept as an allowed code and a byte order."""

    __slots__ = ("code", "byteorder")

    def __init__(self, code, align, copy):
        code = _text(code, "the dtype code")
        if code not in _DTYPE_CODES:
            raise RefusedPickle(f"dtype {code!r} is not allowed, only bool and integer dtypes are")
        if type(align) not in (bool, int) or type(copy) not in (bool, int):
            raise RefusedPickle(f"dtype flags must be booleans, got {describe((align, copy))}")
        self.code = code
        self.byteorder = None  # set by BUILD

    @property
    def itemsize(self):
        return int(self.code[1:])

    def __setstate__(self, state):
        # numpy writes (3, byteorder, subarray, names, fields, elsize, alignment, flags); for a bool or
        # integer dtype all but the byte order are empty.
        if self.byteorder is not None:
            raise RefusedPickle(f"{self!r} given a second BUILD state")
        if type(state) is not tuple or len(state) != 8 or state[0] != 3:
            raise RefusedPickle(f"{self!r}: unexpected state {describe(state)}")
        if state[2:] != (None, None, None, -1, -1, 0):
            raise RefusedPickle(f"{self!r}: state {describe(state)} has a subarray, fields or flags")
        byteorder = _text(state[1], "the dtype byte order")
        if byteorder not in (("|",) if self.itemsize == 1 else ("<", ">")):
            raise RefusedPickle(f"{self!r}: byte order {byteorder!r}")
        self.byteorder = byteorder

    def __repr__(self):
        return f"numpy.dtype({self.code!r})"


class _Array(Placeholder):
    """A numpy array as shape, `_DType`, memory order and raw bytes, checked to fit each other.

    ``_reconstruct`` makes it empty and BUILD fills it (protocols 2-4); ``_frombuffer`` makes it
    filled (protocol 5).
    """

    __slots__ = ("shape", "dtype", "fortran", "data")

    def __init__(self):
        self.shape = self.dtype = self.fortran = self.data = None

    def __setstate__(self, state):
        # numpy writes (1, shape, dtype, is_fortran, raw bytes); object arrays have a list instead of bytes.
        if type(state) is not tuple or len(state) != 5 or state[0] != 1:
            raise RefusedPickle(f"{self!r}: unexpected state {describe(state)}")
        self.fill(*state[1:])

    def fill(self, shape, dtype, fortran, data):
        """Check and keep the array's contents (once)."""
        if self.dtype is not None:
            raise RefusedPickle(f"{self!r} given its contents twice")
        if not isinstance(dtype, _DType):
            raise RefusedPickle(f"{self!r}: the dtype must be a numpy.dtype, got {describe(dtype)}")
        if type(fortran) not in (bool, int):
            raise RefusedPickle(f"{self!r}: the memory order flag must be a boolean, got {describe(fortran)}")
        if type(data) not in (bytes, bytearray):
            raise RefusedPickle(f"{self!r}: the data must be bytes, got {describe(data)}")
        if (type(shape) is not tuple or len(shape) > _MAX_DIMS
                or any(type(n) is not int or not 0 <= n <= _MAX_ELEMENTS for n in shape)):
            raise RefusedPickle(f"{self!r}: bad shape {describe(shape)}")
        count = math.prod(shape)
        if count > _MAX_ELEMENTS:
            raise RefusedPickle(f"{self!r}: shape {describe(shape)} has more than {_MAX_ELEMENTS} elements")
        if len(data) != count * dtype.itemsize:
            raise RefusedPickle(f"{self!r}: shape {describe(shape)} of {dtype!r} needs {count * dtype.itemsize} "
                                f"bytes, the data has {len(data)}")
        if dtype.code == "b1" and data.translate(None, b"\0\1"):
            raise RefusedPickle(f"{self!r}: a bool array holds bytes other than 0 and 1")
        self.shape, self.dtype, self.fortran, self.data = shape, dtype, bool(fortran), data

    def __repr__(self):
        return "numpy array"


class _Scalar(Placeholder):
    """``numpy.core.multiarray.scalar(dtype, raw bytes)``: a numpy bool or integer."""

    __slots__ = ("dtype", "data")

    def __init__(self, dtype, data):
        if not isinstance(dtype, _DType):
            raise RefusedPickle(f"the dtype must be a numpy.dtype, got {describe(dtype)}")
        if type(data) is not bytes or len(data) != dtype.itemsize:
            raise RefusedPickle(f"{dtype!r} needs {dtype.itemsize} bytes, got {describe(data)}")
        if dtype.code == "b1" and data not in (b"\0", b"\1"):
            raise RefusedPickle(f"a bool scalar holds {describe(data)}")
        self.dtype, self.data = dtype, data

    def __repr__(self):
        return "numpy scalar"


def _reconstruct(cls, shape, code):
    """``_reconstruct(numpy.ndarray, (0,), b'b')``: the empty array that numpy's BUILD state fills."""
    if not (isinstance(cls, Global) and cls.qualname == "numpy.ndarray") or shape != (0,) or code not in (b"b", "b"):
        raise RefusedPickle(f"expected (numpy.ndarray, (0,), b'b'), got {describe((cls, shape, code))}")
    return _Array()


def _frombuffer(data, dtype, shape, order):
    """numpy's protocol-5 array, ``_frombuffer(buffer, dtype, shape, order)``, with an in-band buffer."""
    if order not in ("C", "F"):
        raise RefusedPickle(f"memory order must be 'C' or 'F', got {describe(order)}")
    array = _Array()
    array.fill(shape, dtype, order == "F", data)
    return array


def _latin1_bytes(text, encoding):
    """``_codecs.encode(text, 'latin1')``: how Python 3 writes bytes at protocol 2."""
    if type(text) is not str or type(encoding) is not str or encoding.lower() not in _LATIN1_NAMES:
        raise RefusedPickle(f"only latin-1 text is allowed, got {describe((text, encoding))}")
    return text.encode("latin1")


def _empty_bytes():
    """``bytes()``: how Python 3 writes ``b""`` at protocol 2 (e.g. the data of an empty array)."""
    return b""


def _bytearray(*args):
    """``bytearray()``, ``bytearray(bytes)`` (protocols 3-4) or ``bytearray(text, 'latin-1')``
    (protocol 2); never ``bytearray(size)``, which would allocate whatever the file asks for."""
    if not args:
        return bytearray()
    if len(args) == 1 and type(args[0]) is bytes:
        return bytearray(args[0])
    if len(args) == 2:
        return bytearray(_latin1_bytes(*args))
    raise RefusedPickle(f"expected bytes or latin-1 text, got {describe(args)}")


# The names a verification file may use, in numpy 1 (numpy.core) and numpy 2 (numpy._core) spelling.
_BIN_GLOBALS = {
    ("numpy", "ndarray"): None,  # only passed to _reconstruct
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _Scalar,
    ("numpy._core.multiarray", "scalar"): _Scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytearray"): _bytearray,
    ("__builtin__", "bytearray"): _bytearray,
}


def _numpy_dtype(dtype):
    if dtype.byteorder is None:
        raise RefusedPickle(f"{dtype!r} without its BUILD state")
    return np.dtype(dtype.byteorder + dtype.code)


def _real(value):
    """Real data for a value read from a file: a numpy array for an array placeholder, a Python bool
    or int for a scalar, plain data as it is; any other placeholder is refused."""
    if isinstance(value, _Array):
        if value.dtype is None:
            raise RefusedPickle(f"{value!r} without its contents")
        flat = np.frombuffer(value.data, dtype=_numpy_dtype(value.dtype))
        return flat.reshape(value.shape, order="F" if value.fortran else "C")
    if isinstance(value, _Scalar):
        return np.frombuffer(value.data, dtype=_numpy_dtype(value.dtype))[0].item()
    if isinstance(value, Placeholder):
        raise RefusedPickle(f"{value!r} where data was expected")
    return value


def _image_bytes(path, index, item):
    """The encoded bytes of one image entry (after `_real`)."""
    if isinstance(item, (bytes, bytearray)):
        return item
    if isinstance(item, str):  # a byte string that went through a text round trip
        try:
            return item.encode("latin1")
        except UnicodeEncodeError:
            pass
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item
    raise ArcFaceError(f"{path}: image {index} is not an encoded byte string ({type(item).__name__})")


def _as_issame(path, issame):
    """Validate the issame entry (after `_real`) and return it as a bool array."""
    if isinstance(issame, np.ndarray):  # `_real` only builds bool and integer arrays
        if issame.ndim != 1:
            raise ArcFaceError(
                f"{path}: the issame list must be a 1-D boolean array, "
                f"got dtype {issame.dtype} with shape {issame.shape}"
            )
        values = issame.tolist()
    elif isinstance(issame, (list, tuple)):
        values = [_real(value) for value in issame]
    else:
        raise ArcFaceError(
            f"{path}: the second element must be the list of issame flags, "
            f"got {type(issame).__name__}"
        )
    out = np.empty(len(values), dtype=bool)
    for k, value in enumerate(values):
        if isinstance(value, int) and value in (0, 1):  # bool is an int
            out[k] = bool(value)
        else:
            raise ArcFaceError(f"{path}: issame flag {k} is not a boolean ({describe(value)})")
    return out


def _normalise_size(image_size):
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    height, width = (int(v) for v in image_size)
    if height <= 0 or width <= 0:
        raise ArcFaceError(f"image size must be positive, got {tuple(image_size)}")
    return height, width


def _read_pickle(path):
    """The file's pickle as plain data and placeholders."""
    if not os.path.isfile(path):
        raise ArcFaceError(f"{path}: verification file not found")
    try:
        with open(path, "rb") as f:
            return safe_load(f, _BIN_GLOBALS)
    except RefusedPickle as exc:
        raise ArcFaceError(f"{path}: refusing to load: {exc}") from None
    except OSError as exc:
        raise ArcFaceError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    except Exception as exc:  # truncated or garbage data surfaces as many exception types
        raise ArcFaceError(
            f"{path}: not a valid verification .bin file (pickle): {type(exc).__name__}: {exc}"
        ) from None


def _read_pairs(path):
    """The encoded images (bytes-like) and the bool issame array of a ``.bin``, checked to match."""
    data = _read_pickle(path)
    try:
        return _check_pairs(path, _real(data))
    except RefusedPickle as exc:
        raise ArcFaceError(f"{path}: refusing to load: {exc}") from None


def _check_pairs(path, data):
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ArcFaceError(
            f"{path}: expected a pickled pair (images, issame), got {type(data).__name__}"
            + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else "")
        )
    images, issame = (_real(part) for part in data)
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
    if not len(issame):
        raise ArcFaceError(f"{path}: no pairs, the file holds no images")
    return [_image_bytes(path, i, _real(item)) for i, item in enumerate(images)], issame


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
        ArcFaceError: missing, unreadable, truncated or malicious file, wrong structure, no pairs,
        image count not matching the pairs, or an image that cannot be decoded (its index is named).
    """
    path = os.fspath(path)
    height, width = _normalise_size(image_size)
    images, issame = _read_pairs(path)

    out = np.empty((len(images), height, width, 3), dtype=np.uint8)
    indices = range(len(images))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"loading {os.path.basename(path)}", unit="img")
    for i in indices:
        img = decode_image(images[i])
        if img is None:
            raise ArcFaceError(f"{path}: image {i} could not be decoded ({why_undecodable(images[i])})")
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
    atomic_write(path, lambda f: pickle.dump((images, issame), f, protocol=4))
