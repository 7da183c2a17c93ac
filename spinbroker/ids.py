"""Broker-assigned ids: UUID-shaped strings, unique across restarts, cheap to make.

A random 80-bit prefix is drawn once per broker process; each id appends a 48-bit counter.
That is one string format per id instead of a uuid4() call (os.urandom + UUID object),
which matters at hundreds of thousands of commands per second. Ids are recorded in the log,
so replay never calls this.
"""

from __future__ import annotations

import secrets


class IdGenerator:
    __slots__ = ("_counter", "_prefix")

    def __init__(self, prefix_bits: int | None = None) -> None:
        bits = secrets.randbits(80) if prefix_bits is None else prefix_bits
        h = f"{bits:020x}"
        # Version nibble 4 and variant bits 10xx make it a well-formed (random) UUID.
        variant = "89ab"[int(h[15], 16) & 3]
        self._prefix = f"{h[0:8]}-{h[8:12]}-4{h[12:15]}-{variant}{h[16:19]}-"
        self._counter = 0

    def __call__(self) -> str:
        self._counter += 1
        return f"{self._prefix}{self._counter:012x}"

    def many(self, n: int) -> list[str]:
        start = self._counter + 1
        self._counter += n
        prefix = self._prefix
        return [f"{prefix}{i:012x}" for i in range(start, start + n)]
