"""Summing shipped series: one place that knows a histogram is
[bucket counts, sum, smallest value, largest value] (the extremes None
while unknown)."""

import bisect


def add_histogram(store, key, counts, total, low=None, high=None):
    """Add a histogram into ``store[key]``; the first one is copied, never aliased."""
    current = store.get(key)
    if current is None:
        store[key] = [list(counts), total, low, high]
    else:
        current[2], current[3] = merge_extremes(current[0], current[2], current[3],
                                                counts, low, high)
        current[0] = [a + b for a, b in zip(current[0], counts, strict=True)]
        current[1] += total


def merge_extremes(counts, low, high, other_counts, other_low, other_high):
    """(low, high) of two histograms added together. Extremes are None where
    nothing was observed, and where values were but their extremes are not
    known (an agent of the previous wire format): then the sum's are not
    known either, and stay None."""
    unknown = ((low is None and any(counts))
               or (other_low is None and any(other_counts)))
    if unknown:
        return None, None
    if low is None:
        return other_low, other_high
    if other_low is None:
        return low, high
    return min(low, other_low), max(high, other_high)


def rebucket(counts, from_bounds, to_bounds):
    """Counts per bucket of ``from_bounds`` (then +Inf) as counts per bucket of
    ``to_bounds``: each bucket's count goes to the first bucket whose bound is
    not below its own, so ``le`` counts are never overstated (values above
    the last old bound go to +Inf)."""
    moved = [0] * (len(to_bounds) + 1)
    for bound, count in zip(list(from_bounds) + [float("inf")], counts, strict=True):
        moved[bisect.bisect_left(to_bounds, bound)] += count
    return moved
