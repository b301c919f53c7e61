import builtins
import os
import pickle
import pickletools
import struct

import cv2
import numpy as np
import pytest

from src.data.bins import load_bin, save_bin
from src.errors import ArcFaceError


def _rgb_image(seed, size=112):
    rng = np.random.default_rng(seed)
    # Smooth content so JPEG compression keeps it close to the original.
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)


def _encode(rgb, ext=".jpg"):
    ok, buf = cv2.imencode(ext, rgb[:, :, ::-1])
    assert ok
    return buf.tobytes()


def _pairs(n_images=6):
    rgbs = [_rgb_image(i) for i in range(n_images)]
    return rgbs, [_encode(x) for x in rgbs]


def test_round_trip_with_resize(tmp_path):
    rgbs, blobs = _pairs(6)
    small = _rgb_image(99, size=100)
    rgbs[5] = cv2.resize(small, (112, 112), interpolation=cv2.INTER_LINEAR)
    blobs[5] = _encode(small, ".png")
    rgbs[4] = _rgb_image(4)
    blobs[4] = _encode(rgbs[4], ".png")  # lossless: exact round trip
    path = tmp_path / "lfw.bin"
    save_bin(path, blobs, [True, False, True])

    images, issame = load_bin(path)
    assert images.dtype == np.uint8 and images.shape == (6, 112, 112, 3)
    assert issame.dtype == bool and issame.tolist() == [True, False, True]
    # RGB order: the PNG image comes back identical, the JPEGs close.
    np.testing.assert_array_equal(images[4], rgbs[4])
    for i in range(4):
        assert np.abs(images[i].astype(int) - rgbs[i].astype(int)).mean() < 4.0
    # The 100x100 (lossless) image was resized to 112x112.
    np.testing.assert_array_equal(images[5], rgbs[5])

    # Resizing to another size on load.
    images_small, _ = load_bin(path, image_size=(56, 48), progress=True)
    assert images_small.shape == (6, 56, 48, 3)


def test_channel_order_is_rgb(tmp_path):
    red = np.zeros((112, 112, 3), np.uint8)
    red[..., 0] = 255
    path = tmp_path / "c.bin"
    save_bin(path, [_encode(red, ".png"), _encode(red, ".png")], [True])
    images, _ = load_bin(path)
    assert images[0, 0, 0].tolist() == [255, 0, 0]


class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    "make",
    [
        lambda target: _Evil(os.mkdir, (target,)),
        lambda target: _Evil(builtins.open, (target, "w")),
        lambda target: _Evil(builtins.eval, (f"open({target!r}, 'w')",)),
    ],
)
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_executes_nothing(tmp_path, make, protocol):
    target = str(tmp_path / "pwned")
    _, blobs = _pairs(2)
    payload = pickle.dumps(([blobs[0], make(target)], [True]), protocol=protocol)
    path = tmp_path / "evil.bin"
    path.write_bytes(payload)
    with pytest.raises(ArcFaceError) as err:
        load_bin(path)
    assert str(path) in str(err.value)
    assert not os.path.exists(target)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.bin"
    with pytest.raises(ArcFaceError, match="not found") as err:
        load_bin(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("cut", [0, 1, 10, 0.5, -1])
def test_truncated_file(tmp_path, cut):
    _, blobs = _pairs(4)
    path = tmp_path / "agedb_30.bin"
    save_bin(path, blobs, [True, False])
    data = path.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    path.write_bytes(data[:n])
    with pytest.raises(ArcFaceError) as err:
        load_bin(path)
    assert str(path) in str(err.value)


def test_not_a_pickle(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is a jpeg, not a pickle" * 10)
    with pytest.raises(ArcFaceError, match="x.bin"):
        load_bin(path)


def test_corrupt_image_names_index(tmp_path):
    _, blobs = _pairs(6)
    blobs[3] = b"definitely not a jpeg"
    path = tmp_path / "cfp_fp.bin"
    save_bin(path, blobs, [True, False, True])
    with pytest.raises(ArcFaceError, match=r"image 3\b") as err:
        load_bin(path)
    assert str(path) in str(err.value)


def test_empty_image_names_index(tmp_path):
    _, blobs = _pairs(4)
    blobs[0] = b""
    path = tmp_path / "calfw.bin"
    save_bin(path, blobs, [True, False])
    with pytest.raises(ArcFaceError, match=r"image 0\b"):
        load_bin(path)


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"images": []}, "expected a pickled pair"),
        (([b"a"] * 4,), "expected a pickled pair"),
        (("abc", [True]), "list of encoded images"),
        (([b"a"] * 2, "yes"), "issame"),
        (([b"a"] * 2, [2]), "issame flag 0"),
        (([b"a"] * 3, [True]), "odd number of images"),
        (([b"a"] * 4, [True]), "4 images but 1 issame"),
        (([b"a"] * 2, np.array([[True]])), "1-D boolean"),
        (([12, 13], [True]), "image 0 is not an encoded byte string"),
        (([], []), "no pairs"),
        (([], np.array([], dtype=bool)), "no pairs"),
        (([b"a"] * 2, [np.float64(1.0)]), "refusing to load: numpy.dtype: dtype 'f8' is not allowed"),
    ],
)
def test_wrong_structure(tmp_path, obj, message):
    path = tmp_path / "s.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(ArcFaceError, match=message) as err:
        load_bin(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_issame_and_bytearray_accepted(tmp_path, protocol):
    _, blobs = _pairs(4)
    path = tmp_path / "n.bin"
    images = [bytearray(blobs[0]), blobs[1], blobs[2], blobs[3]]
    path.write_bytes(pickle.dumps((images, np.array([True, False])), protocol=protocol))
    _, issame = load_bin(path)
    assert issame.tolist() == [True, False]

    # A list of numpy bool_ scalars and a tuple of images.
    path.write_bytes(
        pickle.dumps((tuple(blobs), [np.bool_(False), np.bool_(True)]), protocol=protocol)
    )
    _, issame = load_bin(path)
    assert issame.tolist() == [False, True]


def test_numpy2_module_names_accepted(tmp_path):
    _, blobs = _pairs(4)
    data = pickle.dumps((blobs, np.array([True, False])), protocol=2)
    assert b"numpy.core.multiarray" in data
    data = data.replace(b"numpy.core.multiarray", b"numpy._core.multiarray")
    path = tmp_path / "n2.bin"
    path.write_bytes(data)
    _, issame = load_bin(path)
    assert issame.tolist() == [True, False]


def _with_numpy2_names(data):
    """The pickle as numpy 2 writes it (numpy._core.* for numpy.core.*); frames are dropped because
    the longer names change their sizes."""
    ops = list(pickletools.genops(data))
    ends = [pos for _, _, pos in ops[1:]] + [len(data)]
    out = []
    for (op, arg, pos), end in zip(ops, ends):
        if op.name == "FRAME":
            continue
        if isinstance(arg, str) and arg.startswith("numpy.core."):
            arg = "numpy._core." + arg[len("numpy.core."):]
            if op.name == "GLOBAL":
                out.append(b"c" + arg.replace(" ", "\n").encode() + b"\n")
            else:
                out.append(b"X" + struct.pack("<I", len(arg)) + arg.encode())
        else:
            out.append(data[pos:end])
    return b"".join(out)


@pytest.mark.parametrize("numpy_version", [1, 2])
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_values_in_every_protocol(tmp_path, protocol, numpy_version):
    """What numpy 1 and 2 write at each protocol: uint8 image arrays (read-only ones as bytes,
    writable ones as bytearray at protocol 5), bool and integer arrays and scalars for issame."""
    _, blobs = _pairs(4)
    reference = tmp_path / "reference.bin"
    save_bin(reference, blobs, [True, False])
    expected_images, _ = load_bin(reference)

    read_only, writable = np.frombuffer(blobs[0], np.uint8), np.frombuffer(blobs[3], np.uint8).copy()
    images = [read_only, blobs[1], bytearray(blobs[2]), writable]
    path = tmp_path / "n.bin"
    for issame in (np.array([True, False]), [np.bool_(True), np.bool_(False)], np.array([1, 0], dtype=">i4"),
                   [np.int64(1), np.uint8(0)], (True, np.int16(0))):
        data = pickle.dumps((images, issame), protocol=protocol)
        if numpy_version == 2:
            data = _with_numpy2_names(data)
            assert b"numpy._core" in data and b"numpy.core" not in data
        path.write_bytes(data)
        loaded, flags = load_bin(path)
        assert flags.dtype == bool and flags.tolist() == [True, False]
        np.testing.assert_array_equal(loaded, expected_images)


def test_python2_style_pickle(tmp_path):
    """Images as protocol-2 BINSTRING (Python 2 ``str``), issame as NEWTRUE/NEWFALSE."""
    _, blobs = _pairs(4)
    parts = [b"\x80\x02(", *[b"T" + struct.pack("<i", len(b)) + b for b in blobs], b"l"]
    parts += [b"(\x88\x89l", b"\x86."]
    path = tmp_path / "py2.bin"
    path.write_bytes(b"".join(parts))
    with open(path, "rb") as f:  # sanity: this really is a py2-style pickle
        with pytest.raises(UnicodeDecodeError):
            pickle.load(f)
    images, issame = load_bin(path)
    assert images.shape == (4, 112, 112, 3)
    assert issame.tolist() == [True, False]


def test_object_dtype_rejected(tmp_path):
    _, blobs = _pairs(2)
    path = tmp_path / "o.bin"
    path.write_bytes(pickle.dumps((blobs, np.array([True], dtype=object)), protocol=4))
    with pytest.raises(ArcFaceError, match="o.bin"):
        load_bin(path)


def test_save_bin_validates(tmp_path):
    with pytest.raises(ArcFaceError, match="3 images but 2"):
        save_bin(tmp_path / "a.bin", [b"a", b"b", b"c"], [True, False])
    with pytest.raises(ArcFaceError, match="image 1"):
        save_bin(tmp_path / "a.bin", [b"a", "b"], [True])
    path = tmp_path / "sub" / "ok.bin"
    save_bin(path, [b"a", b"b"], [1])
    with open(path, "rb") as f:
        assert pickle.load(f) == ([b"a", b"b"], [True])
