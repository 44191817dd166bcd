"""In-process rate limits for the account-recovery endpoints (forgot, resend, token attempts).

The gateway limits per client IP across all replicas; these limits also count per address and
per account, which the gateway cannot see, and hold when the service is reached directly.
Each replica counts on its own (a limit of N is N per replica), which is enough to make
guessing and mail-bombing pointless. Memory is bounded: keys beyond `max_keys` push out the
least recently used.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from auth_svc.domain import AuthError


class TooManyRequests(AuthError):
    def __init__(self, retry_after_seconds: int) -> None:
        super().__init__("Too many requests of this kind: try again later.")
        self.retry_after_seconds = retry_after_seconds


class SlidingWindow:
    """At most `limit` hits per key in any `window_seconds`."""

    def __init__(
        self,
        limit: int,
        window_seconds: float,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window_seconds
        self.max_keys = max_keys
        self._clock = clock
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def hit(self, key: str) -> None:
        """Count one request for `key`; TooManyRequests (not counted) when over the limit."""
        now = self._clock()
        with self._lock:
            hits = self._hits.pop(key, None) or deque()
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            self._hits[key] = hits
            if len(hits) >= self.limit:
                raise TooManyRequests(max(1, math.ceil(hits[0] + self.window - now)))
            hits.append(now)
            while len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
