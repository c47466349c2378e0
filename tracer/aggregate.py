"""Summing shipped series: one place that knows a histogram is [bucket counts, sum]."""


def add_histogram(store, key, counts, total):
    """Add a histogram into ``store[key]``; the first one is copied, never aliased."""
    current = store.get(key)
    if current is None:
        store[key] = [list(counts), total]
    else:
        current[0] = [a + b for a, b in zip(current[0], counts, strict=True)]
        current[1] += total
