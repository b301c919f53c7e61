"""src.safe_pickle and the .bin loader against hand-assembled pickles.

The hostile files reproduce attacks on numpy's own unpickling (a dtype BUILD state with a field
far outside the item, then SETITEM through an array of it) and the classic ones (os.system, ...).
Each is loaded in a fresh interpreter, so memory corruption (a segfault, ``free(): invalid next
size``) fails the test instead of crashing pytest. MindSpore is not imported.
"""
import io
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from src import safe_pickle
from src.data import bins
from src.data.bins import load_bin
from src.safe_pickle import Placeholder, RefusedPickle

ROOT = Path(__file__).resolve().parents[1]

# ---- a small pickle assembler; opcode names as in pickletools ----
NONE, NEWTRUE, NEWFALSE = b"N", b"\x88", b"\x89"
EMPTY_DICT, MARK = b"}", b"("


def glob(module, name):
    """GLOBAL, as protocols 0-3 name a callable."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def stack_glob(module, name):
    """STACK_GLOBAL, as protocols 4-5 name a callable."""
    return text(module) + text(name) + b"\x93"


def text(value):
    """BINUNICODE: a str."""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def raw(data):
    """BINBYTES: bytes (Python 3)."""
    return b"B" + struct.pack("<I", len(data)) + data


def py2str(data):
    """BINSTRING: a Python 2 str, bytes when read with encoding="bytes"."""
    return b"T" + struct.pack("<i", len(data)) + data


def bytearray8(data):
    """BYTEARRAY8: how protocol 5 writes an in-band writable buffer."""
    return b"\x96" + struct.pack("<Q", len(data)) + data


def num(value):
    """LONG1: any int."""
    data = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def tup(*items):
    return MARK + b"".join(items) + b"t"


def lst(*items):
    return MARK + b"".join(items) + b"l"


def call(func, *args):
    """REDUCE: func(*args)."""
    return func + tup(*args) + b"R"


def build(obj, state):
    return obj + state + b"b"


def setitem(obj, key, value):
    return obj + key + value + b"s"


def stream(*parts):
    return b"\x80\x02" + b"".join(parts) + b"."


# ---- numpy's pickle layout, written by hand ----
SIMPLE_DTYPE_STATE = (NONE, NONE, NONE, num(-1), num(-1), num(0))  # subarray, names, fields, elsize, align, flags


def dtype(code, byteorder="|", rest=SIMPLE_DTYPE_STATE):
    """numpy.dtype(code, False, True) with BUILD state (3, byteorder, *rest)."""
    return build(call(glob("numpy", "dtype"), text(code), NEWFALSE, NEWTRUE), tup(num(3), text(byteorder), *rest))


U1, B1, I8 = dtype("u1"), dtype("b1"), dtype("i8", "<")


def reconstruct(core="numpy.core", code=b"b"):
    """The empty array numpy's BUILD state fills (protocols 2-4)."""
    return call(glob(f"{core}.multiarray", "_reconstruct"), glob("numpy", "ndarray"), tup(num(0)), raw(code))


def array(dtype_, shape, data, core="numpy.core"):
    return build(reconstruct(core), tup(num(1), tup(*map(num, shape)), dtype_, NEWFALSE, raw(data)))


def frombuffer(buffer, dtype_, shape, order="C"):
    """numpy's protocol-5 array."""
    return call(glob("numpy.core.numeric", "_frombuffer"), buffer, dtype_, shape, text(order))


def scalar(dtype_, data):
    return call(glob("numpy.core.multiarray", "scalar"), dtype_, raw(data))


_, _png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
PNG = _png.tobytes()
IMAGES = lst(raw(PNG), raw(PNG))


def bin_with_flag(flag):
    """A one-pair .bin whose issame list holds ``flag``."""
    return stream(tup(IMAGES, lst(flag)))


def field_offset_write(code, offset, core="numpy.core", via_frombuffer=False):
    """Attack (1): BUILD a dtype whose field lies ``offset`` bytes into an 8-byte item, make an
    array of it and SETITEM 8 attacker bytes into that field."""
    fields = setitem(EMPTY_DICT, text("f"), tup(I8, num(offset)))
    evil = dtype(code, "|", (NONE, tup(text("f")), fields, num(8), num(1), num(16)))
    if via_frombuffer:
        target = frombuffer(bytearray8(bytes(8)), evil, tup(num(1)))
    else:
        target = build(reconstruct(core), tup(num(1), tup(num(1)), evil, NEWFALSE, raw(bytes(8))))
    return bin_with_flag(setitem(target, text("f"), num(0x4141414141414141)))


# ---- loading in a fresh interpreter ----
_LOAD_SCRIPT = """
import sys
from src.data.bins import load_bin
from src.errors import ArcFaceError
try:
    print("loaded", len(load_bin(sys.argv[1])[1]), "pairs")
except ArcFaceError as exc:
    print(exc)
"""


def load_in_subprocess(tmp_path, payload):
    """load_bin on ``payload`` in a fresh interpreter: its one line of output without the path."""
    path = tmp_path / "hostile.bin"
    path.write_bytes(payload)
    result = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"the loader died with code {result.returncode}: {result.stderr[-2000:]}"
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: "), result.stdout
    return lines[0][len(f"{path}: "):]


REFUSED = "refusing to load: "


def refused(fragment):
    """A pattern for a refusal whose message holds ``fragment``."""
    return re.escape(REFUSED) + ".*" + re.escape(fragment)


def invalid(fragment):
    """A pattern for a malformed-pickle error whose message holds ``fragment``."""
    return re.escape("not a valid verification .bin file (pickle): ") + ".*" + re.escape(fragment)

ATTACKS = [
    # (1) a dtype field far outside the item, written through SETITEM
    pytest.param(field_offset_write("V8", 24), refused("numpy.dtype: dtype 'V8' is not allowed"), id="field-24"),
    pytest.param(field_offset_write("V8", 1 << 20), refused("numpy.dtype: dtype 'V8'"), id="field-1MiB"),
    pytest.param(field_offset_write("V8", 1 << 40), refused("numpy.dtype: dtype 'V8'"), id="field-1TiB"),
    pytest.param(field_offset_write("V8", 24, core="numpy._core"), refused("dtype 'V8'"), id="field-numpy2"),
    pytest.param(field_offset_write("V8", 24, via_frombuffer=True), refused("dtype 'V8'"), id="field-frombuffer"),
    pytest.param(field_offset_write("u1", 1 << 20), refused("has a subarray, fields or flags"),
                 id="field-on-allowed-code"),
    # (2) subarray dtypes
    pytest.param(bin_with_flag(dtype("V16", "|", (tup(I8, tup(num(2))), NONE, NONE, num(16), num(8), num(0)))),
                 refused("dtype 'V16' is not allowed"), id="subarray-void"),
    pytest.param(bin_with_flag(dtype("i8", "<", (tup(I8, tup(num(2))), NONE, NONE, num(16), num(8), num(0)))),
                 refused("numpy.dtype('i8'): state (3, '<', (numpy.dtype('i8'), tuple of length 1), None, None, 16, 8, "
                         "0) has a subarray, fields or flags"), id="subarray-on-allowed-code"),
    pytest.param(bin_with_flag(dtype("u1", "|", (NONE, NONE, NONE, num(-1), num(-1), num(63)))),
                 refused("has a subarray, fields or flags"), id="object-flags"),
    pytest.param(bin_with_flag(build(call(glob("numpy", "dtype"), text("u1"), NEWFALSE, NEWTRUE), tup(num(4)))),
                 refused("numpy.dtype('u1'): unexpected state (4,)"), id="dtype-state-layout"),
    pytest.param(bin_with_flag(array(dtype("u2", "|"), [1], bytes(2))), refused("byte order '|'"),
                 id="dtype-byteorder"),
    # (3) object dtypes and object arrays
    pytest.param(bin_with_flag(dtype("O8")), refused("dtype 'O8' is not allowed"), id="dtype-O"),
    pytest.param(bin_with_flag(build(reconstruct(code=b"O"), tup(num(1), tup(num(1)), U1, NEWFALSE, raw(b"\0")))),
                 refused("numpy.core.multiarray._reconstruct: expected (numpy.ndarray, (0,), b'b'), "
                         "got (numpy.ndarray, (0,), b'O')"), id="reconstruct-O"),
    pytest.param(bin_with_flag(call(glob("numpy", "ndarray"), tup(num(1)), text("O"))),
                 refused("numpy.ndarray may be referenced but not called"), id="ndarray-call"),
    pytest.param(bin_with_flag(glob("numpy", "ndarray") + tup(tup(num(1)), text("O")) + b"\x81"),
                 invalid("UnpicklingError: NEWOBJ class argument must be a type, not Global"), id="ndarray-newobj"),
    pytest.param(bin_with_flag(build(reconstruct(), tup(num(1), tup(num(1)), U1, NEWFALSE, lst(num(1))))),
                 refused("numpy array: the data must be bytes, got [1]"), id="object-array-data"),
    # (4) _frombuffer with data that does not fit the shape, or absurd shapes
    pytest.param(bin_with_flag(frombuffer(bytearray8(bytes(8)), U1, tup(num(3)))),
                 refused("numpy.core.numeric._frombuffer: numpy array: shape (3,) of numpy.dtype('u1') needs 3 "
                         "bytes, the data has 8"), id="frombuffer-mismatch"),
    pytest.param(bin_with_flag(frombuffer(bytearray8(bytes(8)), I8, tup(num(2 ** 62)))),
                 refused("bad shape (4611686018427387904,)"), id="frombuffer-2**62"),
    pytest.param(bin_with_flag(frombuffer(bytearray8(bytes(8)), I8, tup(num(2 ** 62), num(0)))),
                 refused("bad shape"), id="frombuffer-2**62-empty"),
    pytest.param(bin_with_flag(frombuffer(bytearray8(b""), U1, tup(num(1 << 31), num(4)))),
                 refused("has more than 2147483648 elements"), id="frombuffer-too-many"),
    pytest.param(bin_with_flag(frombuffer(bytearray8(bytes(8)), U1, tup(num(-1)))), refused("bad shape (-1,)"),
                 id="frombuffer-negative"),
    pytest.param(bin_with_flag(frombuffer(bytearray8(bytes(8)), U1, tup(num(2), num(-4)))),
                 refused("bad shape (2, -4)"), id="frombuffer-negative-2d"),
    pytest.param(bin_with_flag(frombuffer(bytearray8(bytes(8)), U1, tup(text("8")))), refused("bad shape ('8',)"),
                 id="frombuffer-str-dim"),
    pytest.param(bin_with_flag(frombuffer(bytearray8(bytes(8)), U1, lst(num(8)))), refused("bad shape [8]"),
                 id="frombuffer-list-shape"),
    pytest.param(bin_with_flag(frombuffer(bytearray8(b"\0"), U1, tup(*[num(1)] * 33))),
                 refused("bad shape tuple of length 33"), id="frombuffer-33-dims"),
    pytest.param(bin_with_flag(frombuffer(bytearray8(b"\0"), U1, tup(num(1)), order="K")),
                 refused("memory order must be 'C' or 'F', got 'K'"), id="frombuffer-order"),
    pytest.param(bin_with_flag(frombuffer(bytearray8(b"\0"), text("u1"), tup(num(1)))),
                 refused("the dtype must be a numpy.dtype, got 'u1'"), id="frombuffer-str-dtype"),
    pytest.param(bin_with_flag(frombuffer(bytearray8(b"\0") + b"\x98", U1, tup(num(1)))),
                 refused("the data must be bytes, got memoryview"), id="frombuffer-memoryview"),
    pytest.param(bin_with_flag(frombuffer(bytearray8(b"\2"), B1, tup(num(1)))),
                 refused("a bool array holds bytes other than 0 and 1"), id="frombuffer-bool-2"),
    pytest.param(bin_with_flag(scalar(B1, b"\2")), refused("a bool scalar holds b'\\x02'"), id="scalar-bool-2"),
    pytest.param(bin_with_flag(scalar(I8, b"\1")), refused("numpy.dtype('i8') needs 8 bytes, got b'\\x01'"),
                 id="scalar-short"),
    pytest.param(bin_with_flag(call(scalar(U1, b"\1"))), invalid("TypeError: '_Scalar' object is not callable"),
                 id="call-a-placeholder"),
    # placeholders where data belongs, or left incomplete
    pytest.param(bin_with_flag(glob("numpy", "ndarray")), refused("numpy.ndarray where data was expected"),
                 id="class-as-data"),
    pytest.param(bin_with_flag(U1), refused("numpy.dtype('u1') where data was expected"), id="dtype-as-data"),
    pytest.param(bin_with_flag(reconstruct()), refused("numpy array without its contents"), id="array-unbuilt"),
    pytest.param(bin_with_flag(array(call(glob("numpy", "dtype"), text("u1"), NEWFALSE, NEWTRUE), [1], b"\1")),
                 refused("numpy.dtype('u1') without its BUILD state"), id="dtype-unbuilt"),
    pytest.param(stream(tup(lst(array(U1, [2, 2], bytes(4)), raw(PNG)), lst(NEWTRUE))),
                 re.escape("image 0 is not an encoded byte string (ndarray)"), id="image-2d-array"),
    # the other allowed names, misused
    pytest.param(bin_with_flag(call(glob("_codecs", "encode"), text("x"), text("utf-16"))),
                 refused("_codecs.encode: only latin-1 text is allowed, got ('x', 'utf-16')"), id="codecs-utf16"),
    pytest.param(bin_with_flag(call(glob("builtins", "bytearray"), num(1 << 40))),
                 refused("builtins.bytearray: expected bytes or latin-1 text, got (1099511627776,)"),
                 id="bytearray-size"),
    pytest.param(bin_with_flag(call(glob("numpy", "dtype"), text("u1"))), refused("numpy.dtype: "),
                 id="dtype-arity"),
    # (6) the classic attacks
    pytest.param(bin_with_flag(glob("numpy", "load")), refused("the pickle references 'numpy.load'"),
                 id="numpy-load"),
    pytest.param(bin_with_flag(stack_glob("numpy.core.multiarray\nos", "system")),
                 refused("the pickle references 'numpy.core.multiarray\\nos.system'"), id="newline-in-name"),
    pytest.param(bin_with_flag(stack_glob("copyreg", "_reconstructor")), refused("'copyreg._reconstructor'"),
                 id="copyreg"),
    pytest.param(bin_with_flag(call(glob("__builtin__", "bytes"), num(1 << 40))),
                 refused("__builtin__.bytes: _empty_bytes() takes 0 positional arguments but 1 was given"),
                 id="bytes-size"),
    pytest.param(bin_with_flag(b"\x82\x01"), invalid("ValueError: unregistered extension code 1"), id="EXT1"),
    pytest.param(bin_with_flag(b"\x83\x01\x02"), invalid("unregistered extension code 513"), id="EXT2"),
    pytest.param(bin_with_flag(b"Px\n"), refused("persistent id (PERSID/BINPERSID)"), id="PERSID"),
    pytest.param(bin_with_flag(text("x") + b"Q"), refused("persistent id"), id="BINPERSID"),
    pytest.param(bin_with_flag(b"\x97"), refused("out-of-band buffer (NEXT_BUFFER)"), id="NEXT_BUFFER"),
    pytest.param(stream(tup(lst(bytearray8(PNG) + b"\x98", raw(PNG)), lst(NEWTRUE))),
                 refused("the pickle holds a memoryview, which is not plain data"), id="READONLY_BUFFER"),
    pytest.param(bin_with_flag(b"\x8f"), refused("the pickle holds a set"), id="set"),
]


@pytest.mark.parametrize("payload, expected", ATTACKS)
def test_hostile_numpy_pickles_refused(tmp_path, payload, expected):
    assert re.match(expected, load_in_subprocess(tmp_path, payload))


# (5) item assignment, BUILD and APPEND aimed at each kind of placeholder
PLACEHOLDERS = {
    "class": glob("numpy", "ndarray"),
    "function": glob("numpy.core.multiarray", "_reconstruct"),
    "dtype": U1,
    "array": array(U1, [1], b"\1"),
    "array-protocol5": frombuffer(bytearray8(b"\1"), U1, tup(num(1))),
    "scalar": scalar(B1, b"\1"),
}
REPLACE_CODE = setitem(EMPTY_DICT, text("code"), text("O8"))
MISUSES = {
    "SETITEM": (lambda target: setitem(target, text("code"), text("O8")), "does not support item assignment"),
    "SETITEMS": (lambda target: target + MARK + text("code") + text("O8") + b"u", "does not support item assignment"),
    "BUILD": (lambda target: build(target, REPLACE_CODE),
              REFUSED + ".*(takes no BUILD state|second BUILD state|unexpected state)"),
    "BUILD-slots": (lambda target: build(target, tup(NONE, REPLACE_CODE)),
                    REFUSED + ".*(takes no BUILD state|second BUILD state|unexpected state)"),
    "APPEND": (lambda target: target + num(1) + b"a", "has no attribute 'append'"),
    "APPENDS": (lambda target: target + MARK + num(1) + b"e", "has no attribute 'append'"),
}


@pytest.mark.parametrize("misuse", MISUSES)
@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_placeholders_take_no_items_or_attributes(tmp_path, placeholder, misuse):
    make, expected = MISUSES[misuse]
    assert re.search(expected, load_in_subprocess(tmp_path, bin_with_flag(make(PLACEHOLDERS[placeholder]))))


def test_dtype_build_twice_refused(tmp_path):
    state = tup(num(3), text("<"), *SIMPLE_DTYPE_STATE)
    dtype_twice = build(build(call(glob("numpy", "dtype"), text("i8"), NEWFALSE, NEWTRUE), state), state)
    message = load_in_subprocess(tmp_path, bin_with_flag(scalar(dtype_twice, bytes(8))))
    assert message == REFUSED + "numpy.dtype('i8') given a second BUILD state"


@pytest.mark.parametrize("filled", [array(U1, [1], b"\1"), frombuffer(bytearray8(b"\1"), U1, tup(num(1)))],
                         ids=["reconstruct", "frombuffer"])
def test_array_contents_set_once(tmp_path, filled):
    """A second, well-formed BUILD cannot swap in other data or dtype (e.g. after the first was checked)."""
    refill = build(filled, tup(num(1), tup(num(8)), U1, NEWFALSE, raw(bytes(8))))
    assert load_in_subprocess(tmp_path, bin_with_flag(refill)) == REFUSED + "numpy array given its contents twice"


@pytest.mark.parametrize("command", [
    lambda marker: call(glob("os", "system"), text(f"touch {marker}")),
    lambda marker: call(glob("posix", "system"), text(f"touch {marker}")),
    lambda marker: call(stack_glob("builtins", "exec"), text(f"open({str(marker)!r}, 'w')")),
    lambda marker: call(glob("__builtin__", "eval"), text(f"open({str(marker)!r}, 'w')")),
    lambda marker: MARK + text(f"touch {marker}") + b"ios\nsystem\n",  # INST
    lambda marker: MARK + glob("os", "system") + text(f"touch {marker}") + b"o",  # OBJ
    lambda marker: call(stack_glob("subprocess", "call"), text(f"touch {marker}")),
])
def test_code_execution_refused(tmp_path, command):
    marker = tmp_path / "pwned"
    message = load_in_subprocess(tmp_path, bin_with_flag(command(marker)))
    assert message.startswith(REFUSED + "the pickle references '") and message.endswith("', which is not allowed")
    assert not marker.exists()


# ---- legitimate files written by hand: Python 2 numpy pickles ----
def test_python2_numpy_pickle_loads(tmp_path):
    """What Python 2 numpy wrote: str (BINSTRING) type codes, byte order and data, int flags."""
    def py2_dtype(code):
        reduced = call(glob("numpy", "dtype"), py2str(code), num(0), num(1))
        return build(reduced, tup(num(3), py2str(b"|"), *SIMPLE_DTYPE_STATE))

    bool_array = build(
        call(glob("numpy.core.multiarray", "_reconstruct"), glob("numpy", "ndarray"), tup(num(0)), py2str(b"b")),
        tup(num(1), tup(num(2)), py2_dtype(b"b1"), NEWFALSE, py2str(b"\1\0")),
    )
    bool_scalars = lst(call(glob("numpy.core.multiarray", "scalar"), py2_dtype(b"b1"), py2str(b"\0")),
                       call(glob("numpy.core.multiarray", "scalar"), py2_dtype(b"b1"), py2str(b"\1")))
    images = lst(*[py2str(PNG)] * 4)
    path = tmp_path / "py2.bin"
    path.write_bytes(stream(tup(images, bool_array)))
    images_out, issame = load_bin(path, image_size=4)
    assert images_out.shape == (4, 4, 4, 3) and issame.tolist() == [True, False]
    path.write_bytes(stream(tup(images, bool_scalars)))
    assert load_bin(path)[1].tolist() == [False, True]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("value", [
    np.array([True, False, True]),
    np.arange(6, dtype=np.uint8).reshape(2, 3),
    np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4)),
    np.array([-(2 ** 62), 7], dtype="<i8"),
    np.array([2 ** 63 + 5], dtype=">u8"),
    np.array([-3], dtype="i1"),
    np.zeros((0, 5), dtype="u2"),
    np.int64(-9), np.uint16(513), np.bool_(True),
], ids=lambda value: f"{value.dtype.str}{list(np.shape(value))}")
def test_numpy_values_rebuilt_exactly(value, protocol):
    """The placeholders become the same arrays and numbers numpy pickled, built from plain bytes."""
    loaded = safe_pickle.load(io.BytesIO(pickle.dumps(value, protocol=protocol)), bins._BIN_GLOBALS)
    rebuilt = bins._real(loaded)
    if isinstance(value, np.ndarray):
        assert rebuilt.dtype == value.dtype and rebuilt.shape == value.shape
        np.testing.assert_array_equal(rebuilt, value)
    else:
        assert type(rebuilt) is type(value.item()) and rebuilt == value.item()


@pytest.mark.parametrize("value", [np.array([1.5]), np.array(["ab"]), np.array([1 + 2j]), np.float32(1.0),
                                   np.array([(1, 2)], dtype="u1,u1"), np.array([None], dtype=object)],
                         ids=lambda value: value.dtype.str)
def test_other_numpy_values_refused(value):
    with pytest.raises(RefusedPickle, match="is not allowed"):
        safe_pickle.load(io.BytesIO(pickle.dumps(value, protocol=4)), bins._BIN_GLOBALS)


# ---- the generic core, with an allow-list of its own (nothing here touches numpy) ----
class _Point(Placeholder):
    __slots__ = ("x", "y")

    def __init__(self, x, y):
        if type(x) is not int or type(y) is not int:
            raise RefusedPickle("a point needs two ints")
        self.x, self.y = x, y


GEO = {("geo", "Point"): _Point, ("geo", "Plane"): None}


def _load(*parts, **handlers):
    return safe_pickle.load(io.BytesIO(stream(*parts)), GEO, **handlers)


def test_allowed_factory_builds_placeholders():
    plane, point = _load(tup(glob("geo", "Plane"), call(stack_glob("geo", "Point"), num(1), num(2))))
    assert repr(plane) == "geo.Plane" and (point.x, point.y) == (1, 2)
    shared = _load(MARK + call(glob("geo", "Point"), num(3), num(4)) + b"q\x00" + b"h\x00" + b"l")
    assert shared[0] is shared[1]


@pytest.mark.parametrize("parts, message", [
    ((glob("os", "system"),), "the pickle references 'os.system', which is not allowed"),
    ((stack_glob("geo\n", "Point"),), r"the pickle references 'geo\\n.Point'"),
    ((call(glob("geo", "Plane")),), "geo.Plane may be referenced but not called"),
    ((call(glob("geo", "Point"), num(1), text("2")),), "geo.Point: a point needs two ints"),
    ((call(glob("geo", "Point"), num(1)),), r"geo.Point: _Point.__init__\(\) missing 1 required"),
    ((build(call(glob("geo", "Point"), num(1), num(2)), EMPTY_DICT),), "_Point takes no BUILD state"),
    ((build(glob("geo", "Plane"), tup(NONE, setitem(EMPTY_DICT, text("_factory"), NONE))),),
     "geo.Plane takes no BUILD state"),
    ((b"Pid\n",), r"persistent id \(PERSID/BINPERSID\)"),
    ((b"\x97",), r"out-of-band buffer \(NEXT_BUFFER\)"),
    ((bytearray8(b"abc") + b"\x98",), "the pickle holds a memoryview"),
    ((lst(b"\x8f"),), "the pickle holds a set"),
    ((setitem(EMPTY_DICT, num(1), MARK + b"\x91"),), "the pickle holds a frozenset"),
])
def test_refusals(parts, message):
    with pytest.raises(RefusedPickle, match=message) as err:
        _load(*parts)
    assert "\n" not in str(err.value)


def test_placeholders_have_no_item_assignment():
    with pytest.raises(TypeError, match="does not support item assignment"):
        _load(setitem(glob("geo", "Plane"), text("x"), num(1)))


def test_handlers_supplied_by_the_caller():
    assert _load(lst(b"Pid\n", text("other") + b"Q"), persistent_load=lambda pid: f"<{pid}>") == ["<id>", "<other>"]
    assert _load(lst(b"\x97", b"\x97"), buffers=[b"one", bytearray(b"two")]) == [b"one", bytearray(b"two")]


def test_cycles_and_sharing_are_plain():
    loop = _load(b"]q\x00h\x00a")  # a list that contains itself
    assert loop[0] is loop


def test_describe_keeps_messages_short():
    assert safe_pickle.describe("x" * 81) == "str of length 81"
    assert safe_pickle.describe(1 << 100) == "int of 101 bits"
    assert safe_pickle.describe((1, [2, (3, 4)])) == "(1, [2, tuple of length 2])"
    assert safe_pickle.describe({"a": 1}) == "{'a': 1}"
    assert safe_pickle.describe(memoryview(b"")) == "memoryview"
