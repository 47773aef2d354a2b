"""Hashing of job arguments into the ids the reference Sisyphus gives (format: ../shared/docs/sisyphus.md).

`sis_hash_helper(obj)` turns an object into bytes that depend only on its value and the qualified names of
its types, never on Python's randomised `hash()` or on memory addresses, so ids are equal across processes
and machines. `short_hash` reduces those bytes to 12 characters.
"""
import enum
import hashlib
import inspect
import pathlib
import types

from sisyphus.errors import SisError

HASH_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
MAX_HELPER_LENGTH = 4096

_BASIC = (int, float, bool, str, complex)
_SEQUENCES = (list, tuple)
_SETS = (set, frozenset)
_CONTAINERS = _BASIC + _SEQUENCES + _SETS + (dict,)


class HashError(SisError, TypeError, AssertionError):
    """An object whose value cannot be turned into stable bytes (lambda, object from __main__, ...). Also an
    AssertionError, the type the reference Sisyphus raises (code written for it catches that)."""


def short_hash(obj, length=12, chars=HASH_CHARS):
    """SHA-256 of `sis_hash_helper(obj)` as a big-endian integer, written in base len(chars), lowest digit first."""
    number = int.from_bytes(hashlib.sha256(sis_hash_helper(obj)).digest(), byteorder="big", signed=False)
    digits = []
    for _ in range(length):
        number, digit = divmod(number, len(chars))
        digits.append(chars[digit])
    return "".join(digits)


def sis_hash_helper(obj):
    """Bytes describing `obj`: its type's qualified name followed by its content, in parentheses."""
    parts = [_type_name(obj)]
    kind = type(obj)
    if isinstance(obj, bytes):
        parts.append(obj)
    elif obj is None:
        pass
    elif kind in _BASIC:
        parts.append(repr(obj).encode())
    elif kind in _SEQUENCES:
        parts.extend(sis_hash_helper(item) for item in obj)
    elif kind in _SETS:
        parts.extend(sorted(sis_hash_helper(item) for item in obj))
    elif isinstance(obj, dict):
        parts.extend(sorted(sis_hash_helper(item) for item in obj.items()))
    elif inspect.isfunction(obj):
        if obj.__name__ == "<lambda>":
            raise HashError(f"a lambda function ({obj.__qualname__} in {obj.__module__}) has no stable name to hash")
        _refuse_main(obj, "function")
        parts.append(sis_hash_helper((obj.__module__, obj.__qualname__)))
    elif inspect.isclass(obj):
        _refuse_main(obj, "class")
        parts.append(sis_hash_helper((obj.__module__, obj.__qualname__)))
    elif hasattr(obj, "_sis_hash"):  # a Job or a Path describes itself
        return obj._sis_hash()
    else:
        parts.append(sis_hash_helper(get_object_state(obj)))
    joined = b"(" + b", ".join(parts) + b")"
    if len(joined) > MAX_HELPER_LENGTH:
        return hashlib.sha256(joined).digest()
    return joined


def get_object_state(obj):
    """The value of an object that is hashed in its place (see the contract's 'any other object')."""
    if obj is None:
        return None
    if isinstance(obj, _CONTAINERS):
        if type(obj) in _CONTAINERS:
            return obj
        if not (hasattr(obj, "__getnewargs_ex__") or hasattr(obj, "__getnewargs__")):
            raise HashError(f"cannot hash {type(obj).__qualname__}, a subclass of a built-in container: {obj!r}")
    if isinstance(obj, (types.MethodDescriptorType, types.WrapperDescriptorType)):
        return obj.__qualname__
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return obj.__module__, obj.__qualname__
    if isinstance(obj, pathlib.PurePath):
        return str(obj)

    if hasattr(obj, "__getnewargs_ex__"):
        args = obj.__getnewargs_ex__()
    elif hasattr(obj, "__getnewargs__"):
        args = obj.__getnewargs__()
    else:
        args = None

    if hasattr(obj, "__sis_state__"):
        state = obj.__sis_state__()
    elif hasattr(obj, "__getstate__") and type(obj).__getstate__ is not object.__getstate__:
        state = obj.__getstate__()
    else:
        state = _instance_attributes(obj)
        if not state and not hasattr(obj, "__dict__") and not hasattr(obj, "__slots__"):
            if args is None:
                raise HashError(f"cannot hash {type(obj).__qualname__}: it has no attributes, state or arguments")
            state = None

    if isinstance(obj, enum.Enum):
        state.pop("_sort_order_", None)  # added in Python 3.11; dropped to keep older hashes
    return state if args is None else (args, state)


def _type_name(obj):
    if type(obj) is enum.EnumMeta:
        return b"EnumMeta"  # the name of enum's metaclass before Python 3.11
    return type(obj).__qualname__.encode()


def _refuse_main(obj, what):
    if obj.__module__ == "__main__":
        raise HashError(f"{what} {obj.__qualname__} is defined in __main__, which has no stable name to hash")


def _instance_attributes(obj):
    """Attributes that belong to the object itself: its __dict__, its slots, and data members of native types
    (found with dir()); class attributes, methods and properties are left out."""
    if isinstance(obj, (types.MethodWrapperType, types.BuiltinMethodType)):
        return {"__self__": obj.__self__, "__name__": obj.__name__}
    attributes = {}
    if hasattr(obj, "__dict__"):
        attributes.update(obj.__dict__)
    for key in getattr(obj, "__slots__", ()):
        try:
            attributes[key] = getattr(obj, key)
        except AttributeError:
            pass
    class_attributes = {}
    for cls in reversed(type(obj).__mro__):
        class_attributes.update(getattr(cls, "__dict__", {}))
    for key in dir(obj):
        if key in attributes or (key.startswith("__") and key not in ("__self__", "__func__")):
            continue
        declared = class_attributes.get(key)
        if hasattr(declared, "__get__") and not inspect.ismemberdescriptor(declared):
            continue  # methods, properties and other computed attributes
        try:
            value = getattr(obj, key)
        except AttributeError:
            continue
        if key in class_attributes and class_attributes[key] is value:
            continue
        attributes[key] = value
    return attributes
