"""The exact k-th largest of n values that are read block by block (streamed selection).

TIES trims each task vector at its k-th largest magnitude (Yadav et al., "TIES-Merging", NeurIPS 2023),
and a tensor may be far larger than memory allows to sort. `Selection` finds that value exactly with a
few passes over the blocks, keeping only a small part of the values:

1. A sample of the values brackets the answer between two of its quantiles, BRACKET apart from the
   answer's quantile on either side. The first pass counts the values above the bracket and keeps those
   inside it; when the answer's rank falls inside, it is selected among the kept values (the usual case:
   one pass, about 2 % of the values kept).
2. Where the sample misled (or the bracket holds too many values to keep, e.g. many ties), the pass has
   narrowed the candidates to an interval that excludes the bracket's other side (or to the bracket), and
   the next passes work on that interval: all its values are kept when few enough, else a histogram of
   their order-preserving integer keys (`float_keys`) over 2^HISTOGRAM_BITS equal ranges of keys finds
   the range that holds the answer, exactly, from counts alone.

Every pass strictly narrows the interval of candidate keys (or ends with the answer), and a histogram
pass divides its width by at least 2^HISTOGRAM_BITS, so a float32 selection takes at most 4 passes after
the first whatever the sample was. The values must not hold NaN (the merge driver checks inputs are finite).
"""
import math

import numpy as np
import torch

# A threshold is bracketed between two quantiles of a sample, BRACKET apart from the answer's quantile on
# either side; a sample of SAMPLE_SIZE entries brackets it well for any smooth distribution.
SAMPLE_SIZE = 1 << 15
BRACKET = 0.01
# Candidates are kept in memory up to this fraction of the values (plus MIN_KEPT); beyond it a pass counts.
KEPT_FRACTION = 4 * BRACKET
MIN_KEPT = 1 << 16
HISTOGRAM_BITS = 16

_KEY_DTYPES = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
               torch.float64: torch.int64}


def kth_largest(values: torch.Tensor, k: int, sample_size: int = SAMPLE_SIZE) -> float:
    """The exact k-th largest entry (1 ≤ k ≤ n, ties counted) of the 1-D tensor `values`."""
    values = _selectable(values)
    step = max(1, values.numel() // sample_size)
    selection = Selection(values[::step], k, values.numel())
    while selection.answer is None:
        selection.feed(values)
        selection.finish_pass()
    return selection.answer


class Selection:
    """The exact k-th largest of n values fed block by block, over one or more passes (see the module doc).

    Use: `s = Selection(sample, k, n)`; while `s.answer is None`: `s.feed(block)` for every block of the
    values (in any order, each exactly once), then `s.finish_pass()`. `sample` is a subset of the values
    (the whole of them gives the answer at once); `max_kept` bounds how many values a pass keeps.
    """

    def __init__(self, sample: torch.Tensor, k: int, n: int, max_kept: int | None = None):
        if not 1 <= k <= n:
            raise ValueError(f"cannot select the {k}-th largest of {n} values")
        sample = _selectable(sample)
        self.k, self.n, self.answer = k, n, None
        self.dtype, self.device = sample.dtype, sample.device
        self.max_kept = max_kept if max_kept is not None else int(KEPT_FRACTION * n) + MIN_KEPT
        # The candidates: the values whose keys lie in [low, high]; `above`/`below` count those outside.
        self.low, self.high = float_keys(torch.tensor([-math.inf, math.inf], dtype=self.dtype)).tolist()
        self.above, self.below = 0, 0
        if sample.numel() == n:
            self.answer = _select(sample, k)
            return
        m, quantile = sample.numel(), 1 - k / n  # the answer's rank from below, as a fraction
        lo_rank, hi_rank = math.floor((quantile - BRACKET) * m), math.ceil((quantile + BRACKET) * m) + 1
        lo = _select(sample, m - lo_rank + 1) if lo_rank >= 1 else -math.inf
        hi = _select(sample, m - hi_rank + 1) if hi_rank <= m else math.inf
        bracket = float_keys(torch.tensor([lo, hi], dtype=self.dtype)).tolist()
        self._start_pass(*bracket, keep=True)

    def _start_pass(self, low_key: int, high_key: int, keep: bool):
        """A pass counts the values above keys [low_key, high_key] and keeps those inside (or, if they are
        too many, counts them in a histogram of their keys)."""
        self.bracket = (low_key, high_key)
        self.bounds = (_key_value(low_key, self.dtype), _key_value(high_key, self.dtype))
        self.above_bracket, self.inside_count = 0, 0
        # The kept values go into one buffer grown by doubling: many small arrays kept alive between the
        # blocks' temporaries would fragment the heap, and the process would grow by a block per block.
        size = min(self.max_kept, int(3 * BRACKET * self.n) + 1024)
        self.kept = torch.empty(size, dtype=self.dtype, device=self.device) if keep else None
        self.histogram = None if keep else self._empty_histogram()

    def _empty_histogram(self):
        # Bucket b holds the keys whose top bits (key >> shift) are those of the bracket's low end plus b:
        # the keys of float64 values span more than an int64 holds, their top bits do not.
        low, high = self.bracket
        self.shift = max(0, (high - low).bit_length() - HISTOGRAM_BITS)
        return torch.zeros((high >> self.shift) - (low >> self.shift) + 1, dtype=torch.int64, device=self.device)

    def feed(self, values: torch.Tensor):
        """Take in the next block of values (1-D)."""
        above, inside = _count_and_band(_selectable(values), *self.bounds)
        self.above_bracket += above
        start = self.inside_count
        self.inside_count += inside.numel()
        if self.kept is not None and self.inside_count > self.max_kept:  # too many to keep: count them instead
            self.histogram = self._empty_histogram()
            self._count(self.kept[:start])
            self.kept = None
        if self.kept is None:
            self._count(inside)
            return
        if self.inside_count > self.kept.numel():
            grown = self.kept.new_empty(min(self.max_kept, max(2 * self.kept.numel(), self.inside_count)))
            grown[:start] = self.kept[:start]
            self.kept = grown
        self.kept[start: self.inside_count] = inside

    def _count(self, inside: torch.Tensor):
        buckets = (float_keys(inside) >> self.shift) - (self.bracket[0] >> self.shift)
        self.histogram += torch.bincount(buckets, minlength=self.histogram.numel())

    def finish_pass(self):
        """After all blocks were fed: the answer, or a narrower interval of candidates for one more pass."""
        low_key, high_key = self.bracket
        rank = self.k - self.above_bracket  # the answer's rank (from the top) among the values in the bracket
        if rank < 1:  # above the bracket
            self.low, self.below = high_key + 1, self.n - self.above_bracket
        elif rank > self.inside_count:  # below it
            self.high, self.above = low_key - 1, self.above_bracket + self.inside_count
        elif low_key == high_key:  # every value in the bracket is equal
            self.answer = _key_value(low_key, self.dtype)
        elif self.kept is not None:
            self.answer = _select(self.kept[: self.inside_count], rank)
        else:
            self._narrow_to_bucket(rank)
        self.kept = self.histogram = None
        if self.answer is None:
            if self.low > self.high:
                raise ValueError("the values changed between passes, or hold NaN")
            if self.low == self.high:
                self.answer = _key_value(self.low, self.dtype)
            else:
                self._start_pass(self.low, self.high, keep=self.n - self.above - self.below <= self.max_kept)

    def _narrow_to_bucket(self, rank: int):
        """The candidates become the histogram bucket holding the value of `rank` (from the top)."""
        counts = self.histogram.tolist()
        above = 0
        for bucket in range(len(counts) - 1, -1, -1):
            if above + counts[bucket] >= rank:
                break
            above += counts[bucket]
        first = ((self.bracket[0] >> self.shift) + bucket) << self.shift
        self.low = max(self.bracket[0], first)
        self.high = min(self.bracket[1], first + (1 << self.shift) - 1)
        self.above = self.above_bracket + above
        self.below = self.n - self.above - counts[bucket]


def float_keys(values: torch.Tensor) -> torch.Tensor:
    """Integer keys (int64) ordered as the floating-point `values` are: the bit pattern for non-negative
    values, minus that of the magnitude for negative ones (so −0.0 and +0.0 share the key 0)."""
    bits = values.view(_KEY_DTYPES[values.dtype]).long()
    magnitude = bits & torch.iinfo(_KEY_DTYPES[values.dtype]).max
    return torch.where(bits < 0, -magnitude, magnitude)


def _key_value(key: int, dtype: torch.dtype) -> float:
    """The value of `dtype` whose key is `key` (the inverse of float_keys)."""
    int_dtype = _KEY_DTYPES[dtype]
    bits = key if key >= 0 else -key + torch.iinfo(int_dtype).min  # the sign bit set on the magnitude
    return float(torch.tensor(bits, dtype=int_dtype).view(dtype))


def _selectable(values: torch.Tensor) -> torch.Tensor:
    """`values` flattened, in a dtype the CPU path can select in: numpy has no half types (float32 holds
    their values exactly)."""
    values = values.flatten()
    if values.device.type == "cpu" and values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    return values


def _select(values: torch.Tensor, k: int) -> float:
    """The k-th largest entry of 1-D `values`, exactly (numpy's selection is much faster on the CPU)."""
    n = values.numel()
    if values.device.type == "cpu":
        return float(np.partition(values.numpy(), n - k)[n - k])
    return float(values.kthvalue(n - k + 1).values)


def _count_and_band(values: torch.Tensor, lo: float, hi: float) -> tuple[int, torch.Tensor]:
    """(how many entries are above `hi`, the entries within [lo, hi]). On the CPU numpy does it: torch's
    boolean tensors are several times slower there."""
    if values.device.type == "cpu":
        a = values.numpy()
        lo, hi = a.dtype.type(lo), a.dtype.type(hi)  # exact: both are values of this dtype (or infinite)
        above = a > hi
        inside = np.logical_xor(a >= lo, above)  # a > hi implies a >= lo
        return int(np.count_nonzero(above)), torch.from_numpy(np.compress(inside, a))
    return int((values > hi).sum()), values[(values >= lo) & (values <= hi)]
