"""The hot read path: profiles kept in memory, kept fresh by tailing our own event store.

`GET /users/me` is answered from a dict lookup on the event loop, with the response body
rendered once per profile version. Every replica writes to the same event store, so each
replica follows the store's notification log (`recorder.subscribe`) and updates or evicts
the profiles it holds. While it is not following (startup, database outage) the cache is
bypassed and emptied, so it never serves a profile that may have missed an event.

Races between a request loading a profile and the follower are settled by versions: a
profile never replaces a newer one, and a profile loaded before the last (re)subscription
or older than an event already seen for it is not stored.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from servicekit.eventstore import subscribe
from user_svc.application import ProfileService
from user_svc.domain import Profile
from user_svc.views import ProfileView

log = logging.getLogger("user_svc.cache")

CACHE_LOOKUPS = Counter("user_profile_cache_lookups_total", "Profile cache lookups", ["result"])
CACHE_HITS = CACHE_LOOKUPS.labels("hit")
CACHE_MISSES = CACHE_LOOKUPS.labels("miss")
CACHE_FOLLOWING = Gauge(
    "user_profile_cache_following", "1 while the profile cache follows the event store"
)
SEEN_VERSIONS_MAX = 10_000


@dataclass(frozen=True)
class CachedProfile:
    view: ProfileView
    body: bytes
    public_body: bytes
    etag: str


Render = Callable[[ProfileView], CachedProfile]


class ProfileCache:
    """user id -> CachedProfile. Reads are lock-free dict lookups (event loop thread);
    writes come from the threadpool and the follower thread and take a lock."""

    def __init__(self, render: Render, *, max_entries: int) -> None:
        self._render = render
        self._max_entries = max_entries
        self._entries: dict[uuid.UUID, CachedProfile] = {}
        # Newest version seen by the follower for profiles not cached: a load that raced
        # with that event must not be stored.
        self._seen: OrderedDict[uuid.UUID, int] = OrderedDict()
        self._lock = threading.Lock()
        self._epoch = 0
        self.enabled = False

    def get(self, user_id: uuid.UUID) -> CachedProfile | None:
        if not self.enabled:
            return None
        entry = self._entries.get(user_id)
        (CACHE_HITS if entry is not None else CACHE_MISSES).inc()
        return entry

    @property
    def epoch(self) -> int:
        """Take before loading a profile; pass to `put` after."""
        return self._epoch

    def render(self, view: ProfileView) -> CachedProfile:
        return self._render(view)

    def put(self, view: ProfileView, epoch: int) -> CachedProfile:
        """Store a profile loaded or saved by this process (unless something newer is known)."""
        entry = self._render(view)
        with self._lock:
            if not self.enabled or epoch != self._epoch:
                return entry
            if self._seen.get(view.user_id, 0) > view.version:
                return entry
            current = self._entries.get(view.user_id)
            if current is not None and current.view.version >= view.version:
                return current
            self._store(entry)
        return entry

    def apply(self, event: Any) -> None:
        """Follow one stored event of any replica. An erased profile is dropped: the next
        request loads it (and answers 410)."""
        if not isinstance(event, Profile.Created | Profile.Updated | Profile.Erased):
            return
        user_id: uuid.UUID = event.originator_id
        version: int = event.originator_version
        with self._lock:
            current = self._entries.get(user_id)
            if current is not None and current.view.version >= version:
                return
            if (
                current is not None
                and isinstance(event, Profile.Updated)
                and current.view.version + 1 == version
            ):
                self._store(self._render(current.view.updated_by(event)))
                return
            self._entries.pop(user_id, None)
            self._seen[user_id] = version
            self._seen.move_to_end(user_id)
            while len(self._seen) > SEEN_VERSIONS_MAX:
                self._seen.popitem(last=False)

    def reset(self, *, enabled: bool) -> None:
        """Forget everything; loads begun before this are not stored."""
        with self._lock:
            self._epoch += 1
            self._entries.clear()
            self._seen.clear()
            self.enabled = enabled

    def __len__(self) -> int:
        return len(self._entries)

    def _store(self, entry: CachedProfile) -> None:
        entries = self._entries
        entries.pop(entry.view.user_id, None)
        entries[entry.view.user_id] = entry
        if len(entries) > self._max_entries:
            # Oldest stored first: cheap, and the hot profiles come back on the next miss.
            del entries[next(iter(entries))]


class CacheFollower:
    """A thread tailing the profile event store into the cache, resubscribing on failure."""

    def __init__(
        self, app: ProfileService, cache: ProfileCache, *, retry_seconds: float = 1.0
    ) -> None:
        self.app = app
        self.cache = cache
        self.retry_seconds = retry_seconds
        self.position = 0
        self.failures = 0
        self.following = threading.Event()
        self._stopped = threading.Event()
        self._subscription: Any = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="profile-cache", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        with self._lock:
            if self._subscription is not None:
                self._subscription.stop()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._follow()
            except Exception:
                self.failures += 1
                log.warning("profile cache lost the event store; resubscribing", exc_info=True)
                self._discard_broken_connections()
            finally:
                self.following.clear()
                CACHE_FOLLOWING.set(0)
                self.cache.reset(enabled=False)
            self._stopped.wait(self.retry_seconds)

    def _discard_broken_connections(self) -> None:
        """Replace every dead pooled connection now, after a database restart.

        Otherwise the pool finds them one `getconn` at a time, with a growing back-off
        between checks: recovery then takes tens of seconds for the cache and handlers alike.
        """
        pool = getattr(getattr(self.app.recorder, "datastore", None), "pool", None)
        if pool is None:
            return
        try:
            pool.check()
        except Exception:
            log.debug("could not check the pool's connections", exc_info=True)

    def _follow(self) -> None:
        # Everything up to `start` is in the store, so any later load sees it; everything
        # after arrives through the subscription.
        start = self.app.recorder.max_notification_id() or 0
        subscription = subscribe(self.app.recorder, gt=start)
        with self._lock:
            if self._stopped.is_set():
                subscription.stop()
            self._subscription = subscription
        with subscription:
            self.position = start
            self.cache.reset(enabled=True)
            self.following.set()
            CACHE_FOLLOWING.set(1)
            for notification in subscription:
                event = self.app.mapper.to_domain_event(notification)
                self.cache.apply(event)
                if isinstance(event, Profile.Erased):  # erased by another process
                    self.app.evict_person(event.originator_id)
                self.position = notification.id
        if not self._stopped.is_set():
            msg = "the event store subscription ended"
            raise ConnectionError(msg)
