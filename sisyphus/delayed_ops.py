"""Delayed operations: values computed when they are read (`.get()`), e.g. from Variables that jobs write later.

`var + 1`, `path.format(...)`, `DelayedFormat("{}/x", path)` build objects whose `get()` applies the operation to
the current values. A job taking one as an argument is hashed by the object's attributes (`a`/`b` for the
operators, `string`/`args`/`kwargs` for the functions, ...), so the class and attribute names below are the ones
the reference Sisyphus uses: renaming any of them would change the ids of such jobs.
"""
from sisyphus.hash import HashError, sis_hash_helper


class DelayedGetUndefined(NotImplementedError, AssertionError):
    """get() called on a delayed class that does not define it (an AssertionError too, as in the reference)."""


class DelayedLambdaError(HashError, ValueError):
    """A lambda given to a delayed function: it could not be hashed (ValueError as before, HashError and so
    AssertionError as in the reference)."""


def try_get(value):
    """`value.get()` for a delayed value (Path, Variable, Delayed...), else the value itself."""
    return value.get() if isinstance(value, DelayedBase) else value


class DelayedBase:
    """Base of every delayed value: the operators and helpers below build new delayed values from it."""

    def __init__(self, a, b=None):
        self.a = a
        self.b = b

    @staticmethod
    def _is_set_helper(value):
        return not isinstance(value, DelayedBase) or value.is_set()

    def is_set(self):
        """True once every delayed value this one reads can be read."""
        return self._is_set_helper(self.a) and self._is_set_helper(self.b)

    def __add__(self, other):
        return DelayedAdd(self, other)

    def __radd__(self, other):
        return DelayedAdd(other, self)

    def __sub__(self, other):
        return DelayedSub(self, other)

    def __rsub__(self, other):
        return DelayedSub(other, self)

    def __mul__(self, other):
        return DelayedMul(self, other)

    def __rmul__(self, other):
        return DelayedMul(other, self)

    def __truediv__(self, other):
        return DelayedTrueDiv(self, other)

    def __rtruediv__(self, other):
        return DelayedTrueDiv(other, self)

    def __floordiv__(self, other):
        return DelayedFloorDiv(self, other)

    def __rfloordiv__(self, other):
        return DelayedFloorDiv(other, self)

    def __mod__(self, other):
        return DelayedMod(self, other)

    def __pow__(self, other, modulo=None):
        if modulo is None:
            return DelayedPow(self, other)
        return DelayedMod(DelayedPow(self, other), modulo)

    def __rpow__(self, other):
        return DelayedPow(other, self)

    def __round__(self, n=None):
        return DelayedRound(self, n)

    def __getitem__(self, key):
        return DelayedGetItem(self, key)

    def __call__(self, *args, **kwargs):
        return DelayedCall(self, args, kwargs)

    def format(self, *args, **kwargs):
        return DelayedFormat(self, *args, **kwargs)

    def rformat(self, fstring, *args, **kwargs):
        """`a.rformat(b, ...)` is `b.format(a, ...)`, delayed."""
        return DelayedFormat(fstring, self, *args, **kwargs)

    def replace(self, *args, **kwargs):
        return DelayedReplace(self, *args, **kwargs)

    def function(self, func, *args, **kwargs):
        return DelayedFunction(self, func, *args, **kwargs)

    def fallback(self, fallback):
        """This value once it is set, `fallback` until then."""
        return DelayedFallback(self, fallback)

    def get(self):
        raise DelayedGetUndefined(f"{type(self).__qualname__} must define get()")

    def __repr__(self):
        return str(self.get())

    def __str__(self):
        return str(self.get())


class DelayedAdd(DelayedBase):
    def get(self):
        return try_get(self.a) + try_get(self.b)


class DelayedSub(DelayedBase):
    def get(self):
        return try_get(self.a) - try_get(self.b)


class DelayedMul(DelayedBase):
    def get(self):
        return try_get(self.a) * try_get(self.b)


class DelayedTrueDiv(DelayedBase):
    def get(self):
        return try_get(self.a) / try_get(self.b)


class DelayedFloorDiv(DelayedBase):
    def get(self):
        return try_get(self.a) // try_get(self.b)


class DelayedMod(DelayedBase):
    def get(self):
        return try_get(self.a) % try_get(self.b)


class DelayedPow(DelayedBase):
    def get(self):
        return try_get(self.a) ** try_get(self.b)


class DelayedRound(DelayedBase):
    def get(self):
        return round(try_get(self.a), try_get(self.b))


class DelayedGetItem(DelayedBase):
    def get(self):
        return try_get(self.a)[try_get(self.b)]


class DelayedCall(DelayedBase):
    """`delayed(*args, **kwargs)`: calls the delayed value's result."""

    def __init__(self, func, args, kwargs):
        self.func = func
        self.args = args
        self.kwargs = kwargs

    def is_set(self):
        values = [self.func, *self.args, *self.kwargs.values()]
        return all(self._is_set_helper(v) for v in values)

    def get(self):
        func = try_get(self.func)
        return func(*(try_get(a) for a in self.args), **{k: try_get(v) for k, v in self.kwargs.items()})


class Delayed(DelayedBase):
    """Wraps any value as a delayed one; hashed exactly like the value it wraps (`tk.Delayed`)."""

    def __init__(self, a):
        self.a = a
        self.b = None

    def get(self):
        return try_get(self.a)

    def _sis_hash(self):
        return sis_hash_helper(self.a)


class DelayedFunctionBase(DelayedBase):
    """A call of a function on `string` (the first argument) and further arguments, made when read."""

    def __init__(self, string, *args, **kwargs):
        self.string = string
        self.args = args
        self.kwargs = kwargs

    def is_set(self):
        return all(self._is_set_helper(v) for v in [self.string, *self.args, *self.kwargs.values()])


class DelayedFunction(DelayedFunctionBase):
    """`func(value, *args, **kwargs)`; func must have a name (lambdas cannot be hashed)."""

    def __init__(self, string, func, *args, **kwargs):
        if func.__name__ == "<lambda>":
            raise DelayedLambdaError("DelayedFunction: a lambda cannot be hashed; pass a named function")
        self.func = func
        super().__init__(string, *args, **kwargs)

    def get(self):
        return self.func(try_get(self.string), *self.args, **self.kwargs)


class DelayedFormat(DelayedFunctionBase):
    """`string.format(*args, **kwargs)` with every delayed argument read first."""

    def get(self):
        return try_get(self.string).format(*(try_get(a) for a in self.args), **self.kwargs)


class DelayedReplace(DelayedFunctionBase):
    def get(self):
        return try_get(self.string).replace(*self.args, **self.kwargs)


class DelayedFallback(DelayedBase):
    """`a` once it is set, else `b`."""

    def get(self):
        return self.a.get() if self.a.is_set() else try_get(self.b)


class DelayedSlice(DelayedBase):
    def __init__(self, iterable, index_start=0, index_end=-1, step=1):
        self.iterable = iterable
        self.index_start = index_start
        self.index_end = index_end
        self.step = step

    def is_set(self):
        values = [self.iterable, self.index_start, self.index_end, self.step]
        return all(self._is_set_helper(v) for v in values)

    def get(self):
        return try_get(self.iterable)[try_get(self.index_start):try_get(self.index_end):try_get(self.step)]


class DelayedJoin(DelayedBase):
    """`separator.join(items)` with every delayed item read first."""

    def __init__(self, iterable, separator):
        self.iterable = iterable
        self.separator = separator

    def is_set(self):
        return all(self._is_set_helper(v) for v in self.iterable)

    def get(self):
        return self.separator.join(try_get(item) for item in self.iterable)
