"""Reading pickles that were written by numpy/torch without running any of their code.

Why: a restricted unpickler that hands out *real* library callables is still exploitable. A numpy
``.bin`` can BUILD a ``numpy.dtype`` from an unchecked state (a field far outside its item size),
build an array of it and SETITEM attacker bytes outside the array's buffer. So here the pickle
machinery never meets a library object. Each global the file names is looked up in the caller's
allow-list, which maps it to a factory the caller wrote; the factory checks its arguments and
returns plain data or a `Placeholder` that records checked plain values. The caller turns the
placeholders into real objects after `load` returns, building them itself from plain bytes.

What an opcode can still do to a value, and why that is harmless:
  * call it (REDUCE, OBJ, INST): only a `Global` is callable, and it runs the caller's factory.
    NEWOBJ/NEWOBJ_EX need a class and no class is ever handed out.
  * BUILD: every placeholder has a ``__setstate__`` that refuses unless its class accepts state,
    so pickle never falls back to setting attributes; plain values have no ``__dict__``.
  * SETITEM(S), APPEND(S), ADDITEMS: placeholders have no ``__setitem__``, ``append``,
    ``extend`` or ``add``; on lists, dicts and bytearrays they only change plain data.
  * persistent ids (PERSID/BINPERSID) and out-of-band buffers (NEXT_BUFFER) are refused unless
    the caller passes a handler; a READONLY_BUFFER memoryview fails the final type check.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Mapping
from typing import IO

__all__ = ["Global", "Placeholder", "RefusedPickle", "SafeUnpickler", "check_plain", "describe", "load"]

# A factory gets the positional arguments of the pickled call; None allows the name only as a
# value (e.g. the class a reconstructor receives), never as something to call.
Factory = Callable[..., object] | None
AllowList = Mapping[tuple[str, str], Factory]

_PLAIN_TYPES = (type(None), bool, int, float, str, bytes, bytearray)
_CONTAINER_TYPES = (tuple, list, dict)


class RefusedPickle(Exception):
    """The pickle asks for something the allow-list does not permit."""


def describe(value, depth=2):
    """A short one-line description of a value read from a file, for error messages: long
    strings, big ints and nested or long containers are summarised instead of printed."""
    if isinstance(value, (str, bytes, bytearray)) and len(value) > 80:
        return f"{type(value).__name__} of length {len(value)}"
    if type(value) is int and value.bit_length() > 64:
        return f"int of {value.bit_length()} bits"
    if type(value) in _CONTAINER_TYPES:
        if depth == 0 or len(value) > 8:
            return f"{type(value).__name__} of length {len(value)}"
        if type(value) is dict:
            parts = [f"{describe(key, depth - 1)}: {describe(item, depth - 1)}" for key, item in value.items()]
            return "{" + ", ".join(parts) + "}"
        parts = [describe(item, depth - 1) for item in value]
        if type(value) is list:
            return "[" + ", ".join(parts) + "]"
        return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
    if type(value) in _PLAIN_TYPES or isinstance(value, Placeholder):
        return repr(value)
    return type(value).__name__


class Placeholder:
    """Base of the inert stand-ins a factory returns in place of a library object.

    Subclasses keep their data in ``__slots__``; one that accepts BUILD state overrides
    ``__setstate__`` and checks the state before storing it.
    """

    __slots__ = ()

    def __setstate__(self, state):
        raise RefusedPickle(f"{self!r} takes no BUILD state")

    def __repr__(self):
        return type(self).__name__


class Global(Placeholder):
    """What the unpickler returns for an allowed global: calling it runs the caller's factory."""

    __slots__ = ("qualname", "_factory")

    def __init__(self, qualname: str, factory: Factory):
        self.qualname = qualname
        self._factory = factory

    def __call__(self, *args):
        if self._factory is None:
            raise RefusedPickle(f"{self.qualname} may be referenced but not called")
        try:
            return self._factory(*args)
        except (RefusedPickle, TypeError) as exc:  # TypeError: the wrong number of arguments
            raise RefusedPickle(f"{self.qualname}: {exc}") from None

    def __repr__(self):
        return self.qualname


class _NoBuffers:
    """The ``buffers`` iterator when the caller allows none: NEXT_BUFFER raises RefusedPickle
    instead of pickle's generic error."""

    def __iter__(self):
        return self

    def __next__(self):
        raise RefusedPickle("the pickle refers to an out-of-band buffer (NEXT_BUFFER)")


class SafeUnpickler(pickle.Unpickler):
    """Unpickler resolving globals through an allow-list of factories (see the module docstring).

    Python 2 ``str`` values load as bytes (``encoding="bytes"``), so nothing is decoded.
    """

    def __init__(self, file: IO[bytes], allowed: AllowList,
                 persistent_load: Callable[[object], object] | None = None,
                 buffers: Iterable[object] | None = None):
        super().__init__(file, encoding="bytes", buffers=_NoBuffers() if buffers is None else buffers)
        self._allowed = allowed
        self._globals: dict[tuple[str, str], Global] = {}
        self._persistent_handler = persistent_load

    def find_class(self, module, name):
        key = (module, name)
        if key not in self._allowed:
            raise RefusedPickle(f"the pickle references {describe(f'{module}.{name}')}, which is not allowed")
        if key not in self._globals:
            self._globals[key] = Global(f"{module}.{name}", self._allowed[key])
        return self._globals[key]

    def persistent_load(self, pid):
        if self._persistent_handler is None:
            raise RefusedPickle("the pickle refers to a persistent id (PERSID/BINPERSID)")
        return self._persistent_handler(pid)


def check_plain(value):
    """Refuse anything in ``value`` but None, bool, int, float, str, bytes, bytearray, tuples,
    lists and dicts of those, and placeholders (e.g. a READONLY_BUFFER memoryview or a set)."""
    seen = set()
    todo = [value]
    while todo:
        item = todo.pop()
        if type(item) in _PLAIN_TYPES or isinstance(item, Placeholder):
            continue
        if type(item) not in _CONTAINER_TYPES:
            raise RefusedPickle(f"the pickle holds a {type(item).__name__}, which is not plain data")
        if id(item) in seen:  # shared (memoised) or self-containing
            continue
        seen.add(id(item))
        # Keys and values rather than items(): an id() is only unique while its object is alive,
        # and the (key, value) tuples of items() would not be.
        todo.extend(item.keys() if type(item) is dict else item)
        if type(item) is dict:
            todo.extend(item.values())


def load(file: IO[bytes], allowed: AllowList, *, persistent_load: Callable[[object], object] | None = None,
         buffers: Iterable[object] | None = None):
    """Read one pickle from a binary file: plain data and the placeholders made by ``allowed``.

    Raises RefusedPickle for a global outside ``allowed``, a persistent id or out-of-band buffer
    without a handler, a value a factory or placeholder refuses, or a result that is not plain
    data; a malformed stream raises what pickle raises (UnpicklingError, EOFError, ...).
    """
    value = SafeUnpickler(file, allowed, persistent_load=persistent_load, buffers=buffers).load()
    check_plain(value)
    return value
