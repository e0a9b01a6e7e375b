"""Seeds derived from a spec's seed: one formula, so a site and the simulator's pooled baseline
draw the same kind of stream for the same purpose.

``derived_seed(seed, *labels)`` = the first 8 bytes (little-endian) of
sha256("seed:label:label...") shifted right by one: a 63-bit non-negative int, fit for
``torch.Generator.manual_seed``. Changing the formula changes every seeded run's numbers.
(numpy's SeedSequence would do the job too, but gives other numbers; seeded runs are kept
bit-identical to those recorded.)
"""

from __future__ import annotations

import hashlib

__all__ = ["derived_seed"]


def derived_seed(seed: int, *labels: str) -> int:
    """A 63-bit seed for the purpose named by ``labels`` (e.g. site, purpose)."""
    text = ":".join([str(seed), *labels])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
