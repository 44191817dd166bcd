"""Crypto-shredding: the personal fields of stored events, encrypted with a key per person.

A service declares which stored-event classes carry personal fields, whose they are (the
subject: the originator by default) and what each reads as once erased (`PersonalData`).
`PersonalDataMapper` replaces each such field by an envelope `{"_pii_": "<nonce|ciphertext>"}`
(AES-256-GCM, the additional data binding subject, event topic and field name) when an event
is stored, and opens it again when it is read, before any upcaster runs. Erasing a person
destroys their key (`PersonalKeys.erase`): the events, versions and positions stay, their
personal fields read as erased (None, or {} for dict-valued fields), and aggregates still load.

Keys live in the service's own database (`personal_keys`), each wrapped by the service key
from the settings (AES-256-GCM, additional data: the subject id). Events stored before
encryption was turned on (plain values) still load as they are. The library's whole-state
`CIPHER_KEY` is independent of this and untouched.

`python -m servicekit.shredding` prints a new service key for the settings.
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, cast

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eventsourcing.domain import Snapshot
from eventsourcing.persistence import (
    Cipher,
    Compressor,
    Mapper,
    MapperDeserialisationError,
    StoredEvent,
    Transcoder,
    find_id_convertor,
)
from eventsourcing.utils import get_topic, resolve_topic
from prometheus_client import Counter
from psycopg_pool import ConnectionPool

log = logging.getLogger("servicekit.shredding")
T = TypeVar("T")

ENVELOPE = "_pii_"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
_WRAP_VERSION = 1

# How long a person's key stays in a process's memory after it was read. This is the bound on
# how long another replica may still decrypt (and serve from its own caches) a person's data
# after `erase` destroyed the key elsewhere. A destroyed key is remembered as such for good.
KEY_CACHE_SECONDS = 30.0
KEY_CACHE_ENTRIES = 10_000
# Aggregates whose subject is another id (an e-mail registration's account): remembered so an
# erasure can evict them from the repository's cache too. Ten times the aggregate cache.
RELATED_ENTRIES = 100_000

PERSONAL_KEYS_TABLE = "personal_keys"
PERSONAL_KEYS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {PERSONAL_KEYS_TABLE} ("
    "subject uuid PRIMARY KEY, wrapped bytea NULL, "
    "created_at timestamptz NOT NULL DEFAULT now(), erased_at timestamptz NULL)"
)

ERASED_READS = Counter(
    "personal_data_erased_reads_total",
    "Personal fields read after their person's key was destroyed, by event type",
    ["event_type"],
)
DROPPED_WRITES = Counter(
    "personal_data_dropped_writes_total",
    "Personal fields of new events of an erased person, stored as erased instead",
    ["event_type"],
)
UNPUBLISHED_ERASED = Counter(
    "relay_erased_events_unpublished_total",
    "Stored events not published because a field their contract requires was erased",
    ["event_type"],
)


class PersonalDataError(ValueError):
    """A service key or a personal-data envelope that cannot be used."""


def create_table(conn: psycopg.Connection[Any]) -> None:
    """Create `personal_keys` (idempotent); `esctl db init` runs it for each service that
    declares personal data."""
    conn.execute(PERSONAL_KEYS_DDL)


def new_service_key() -> str:
    """A fresh service key (32 random bytes, base64url), for `*_PERSONAL_DATA_KEY`."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).rstrip(b"=").decode()


def service_key_from(text: str) -> bytes:
    """The 32 bytes of a base64url service key; PersonalDataError otherwise."""
    try:
        raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except ValueError:
        raise PersonalDataError("the personal data key is not base64url") from None
    if len(raw) != KEY_BYTES:
        msg = f"the personal data key must be {KEY_BYTES} bytes (base64url), not {len(raw)}"
        raise PersonalDataError(msg)
    return raw


# --- declarations -------------------------------------------------------------------------


def _erased_value(value: Any) -> Any:
    return {} if isinstance(value, dict) else None


@dataclass(frozen=True)
class PersonalFields:
    """The personal fields of one stored-event class (or of one aggregate's snapshots).

    `fields` maps a field name to what it reads as once erased (None, or {} for dicts);
    `subject` names the attribute holding the person's id (the originator by default).
    """

    topic: str
    fields: Mapping[str, Any]
    subject: str = "originator_id"
    snapshot: bool = False

    def erased(self, name: str) -> Any:
        return _erased_value(self.fields[name])


def personal_fields(
    event_class: type[Any], *names: str, subject: str = "originator_id", **erased_as: Any
) -> PersonalFields:
    """`event_class`'s personal fields: each of `names` reads as None once erased, each of
    `erased_as` as its given value (`changes={}` for a dict-valued field)."""
    fields: dict[str, Any] = dict.fromkeys(names)
    fields.update({name: _erased_value(value) for name, value in erased_as.items()})
    return PersonalFields(get_topic(event_class), fields, subject)


def snapshot_fields(aggregate_class: type[Any], *names: str, **erased_as: Any) -> PersonalFields:
    """The personal attributes of `aggregate_class`'s snapshot state (the snapshot carries
    the whole state: these keys of it are encrypted, the rest stays readable)."""
    fields: dict[str, Any] = dict.fromkeys(names)
    fields.update({name: _erased_value(value) for name, value in erased_as.items()})
    return PersonalFields(get_topic(aggregate_class), fields, snapshot=True)


class PersonalData:
    """A service's declarations: which stored events carry which personal fields."""

    def __init__(self, *declarations: PersonalFields) -> None:
        self.events: dict[str, PersonalFields] = {}
        self.snapshots: dict[str, PersonalFields] = {}
        for declaration in declarations:
            table = self.snapshots if declaration.snapshot else self.events
            if declaration.topic in table:
                msg = f"{declaration.topic} is declared twice"
                raise ValueError(msg)
            table[declaration.topic] = declaration


# --- keys ---------------------------------------------------------------------------------


@dataclass
class _Entry:
    cipher: AESGCM | None  # None: destroyed (or never made)
    expires: float  # time.monotonic(); inf for a destroyed key


class PersonalKeys:
    """Per-person AES-256-GCM keys in `personal_keys`, wrapped by the service key.

    Keys are made on first use and cached in memory (LRU, `cache_entries`), each for at most
    `cache_seconds` (`KEY_CACHE_SECONDS`): that is how long another replica may still
    decrypt a person's data after an erasure. Its own small pool, autocommit: a key is made
    (and committed) before the events that use it are saved, never inside their transaction.
    """

    def __init__(
        self,
        connect_kwargs: Mapping[str, Any],
        service_key: bytes,
        *,
        pool_size: int = 4,
        cache_seconds: float = KEY_CACHE_SECONDS,
        cache_entries: int = KEY_CACHE_ENTRIES,
        name: str = "personal-keys",
    ) -> None:
        if len(service_key) != KEY_BYTES:
            msg = f"the service key must be {KEY_BYTES} bytes"
            raise PersonalDataError(msg)
        self._wrapper = AESGCM(service_key)
        self._cache_seconds = cache_seconds
        self._cache_entries = cache_entries
        self._cache: OrderedDict[uuid.UUID, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        # A new key is committed without waiting for its WAL flush: the events sealed with it
        # are saved after it, synchronously, and flushing their commit flushes the key's
        # (the WAL is one sequence), so no crash keeps an event and loses its key. That spares
        # a register a second fsync. An erasure waits for its flush (`erase`).
        options = f"{connect_kwargs.get('options', '')} -c synchronous_commit=off".strip()
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            kwargs={**connect_kwargs, "options": options, "autocommit": True},
            min_size=1,
            max_size=pool_size,
            open=False,
            name=name,
            timeout=10.0,
        )
        self._opened = False
        self._open_lock = threading.Lock()

    def close(self) -> None:
        with self._open_lock:
            if self._opened:
                self._pool.close()
                self._opened = False

    def cipher_for(self, subject: uuid.UUID, *, create: bool) -> AESGCM | None:
        """The person's key, made first when `create` and they have none; None once erased
        (or, when not `create`, when they never had one)."""
        entry = self._cached(subject)
        if entry is not None:
            return entry.cipher
        row = self._run(self._read_or_create if create else self._read, subject)
        cipher = AESGCM(self._unwrap(subject, bytes(row[0]))) if row and row[0] else None
        if cipher is not None or row is not None:
            self._remember(subject, cipher)
        return cipher

    def erase(self, subject: uuid.UUID) -> bool:
        """Destroy the person's key (a tombstone if they had none, so none is made later).
        True when this call destroyed it; False when it was already destroyed."""

        def destroy(conn: psycopg.Connection[Any], subject: uuid.UUID) -> bool:
            with conn.transaction():
                conn.execute("SET LOCAL synchronous_commit TO on")  # durable once it returns
                cur = conn.execute(
                    f"INSERT INTO {PERSONAL_KEYS_TABLE} AS k (subject, wrapped, erased_at) "  # noqa: S608
                    "VALUES (%s, NULL, now()) ON CONFLICT (subject) DO UPDATE "
                    "SET wrapped = NULL, erased_at = now() WHERE k.erased_at IS NULL",
                    (subject,),
                )
            return bool(cur.rowcount == 1)

        destroyed = self._run(destroy, subject)
        self._remember(subject, None)
        return destroyed

    def erased_at(self, subject: uuid.UUID) -> datetime | None:
        def read(conn: psycopg.Connection[Any], subject: uuid.UUID) -> datetime | None:
            row = conn.execute(
                f"SELECT erased_at FROM {PERSONAL_KEYS_TABLE} WHERE subject = %s",  # noqa: S608
                (subject,),
            ).fetchone()
            return row[0] if row else None

        return self._run(read, subject)

    def _read(self, conn: psycopg.Connection[Any], subject: uuid.UUID) -> Any:
        return conn.execute(
            f"SELECT wrapped FROM {PERSONAL_KEYS_TABLE} WHERE subject = %s",  # noqa: S608
            (subject,),
        ).fetchone()

    def _read_or_create(self, conn: psycopg.Connection[Any], subject: uuid.UUID) -> Any:
        """One round trip: the new key, or the one already there. A row another session is
        inserting at the same moment is not in this statement's snapshot: then read again."""
        row = conn.execute(
            f"WITH made AS (INSERT INTO {PERSONAL_KEYS_TABLE} (subject, wrapped) "  # noqa: S608
            "VALUES (%s, %s) ON CONFLICT (subject) DO NOTHING RETURNING wrapped) "
            f"SELECT wrapped FROM made UNION ALL "
            f"SELECT wrapped FROM {PERSONAL_KEYS_TABLE} WHERE subject = %s LIMIT 1",
            (subject, self._wrap(subject, secrets.token_bytes(KEY_BYTES)), subject),
        ).fetchone()
        return row if row is not None else self._read(conn, subject)

    def _run(
        self, statement: Callable[[psycopg.Connection[Any], uuid.UUID], T], subject: uuid.UUID
    ) -> T:
        """`statement` on a pooled connection; once more on a fresh one if that connection
        was dead (a database restart: the pool discards a broken connection it gets back)."""
        try:
            with self._connection() as conn:
                return statement(conn, subject)
        except psycopg.OperationalError:
            with self._connection() as conn:
                return statement(conn, subject)

    def forget(self, subject: uuid.UUID) -> None:
        """Drop the person's key from memory (another process erased them)."""
        with self._lock:
            self._cache.pop(subject, None)

    def _connection(self) -> Any:
        if not self._opened:
            with self._open_lock:
                if not self._opened:
                    self._pool.open(wait=False)
                    self._opened = True
        return self._pool.connection()

    def _cached(self, subject: uuid.UUID) -> _Entry | None:
        with self._lock:
            entry = self._cache.get(subject)
            if entry is None:
                return None
            if entry.expires < time.monotonic():
                del self._cache[subject]
                return None
            self._cache.move_to_end(subject)
            return entry

    def _remember(self, subject: uuid.UUID, cipher: AESGCM | None) -> None:
        expires = time.monotonic() + self._cache_seconds if cipher else float("inf")
        with self._lock:
            self._cache[subject] = _Entry(cipher, expires)
            self._cache.move_to_end(subject)
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)

    def _wrap(self, subject: uuid.UUID, key: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return bytes([_WRAP_VERSION]) + nonce + self._wrapper.encrypt(nonce, key, subject.bytes)

    def _unwrap(self, subject: uuid.UUID, wrapped: bytes) -> bytes:
        if not wrapped or wrapped[0] != _WRAP_VERSION:
            msg = f"the personal key of {subject} has an unknown format"
            raise PersonalDataError(msg)
        nonce, sealed = wrapped[1 : 1 + NONCE_BYTES], wrapped[1 + NONCE_BYTES :]
        try:
            return self._wrapper.decrypt(nonce, sealed, subject.bytes)
        except InvalidTag:
            msg = (
                f"the personal key of {subject} does not open with this service key "
                "(a different *_PERSONAL_DATA_KEY, or a tampered row)"
            )
            raise PersonalDataError(msg) from None


class MemoryPersonalKeys:
    """`PersonalKeys` held in memory only: for applications on the library's POPO store
    (unit tests). Same behaviour, no database."""

    def __init__(self) -> None:
        self._keys: dict[uuid.UUID, AESGCM | None] = {}
        self._erased: dict[uuid.UUID, datetime] = {}
        self._lock = threading.Lock()

    def cipher_for(self, subject: uuid.UUID, *, create: bool) -> AESGCM | None:
        with self._lock:
            if subject not in self._keys and create:
                self._keys[subject] = AESGCM(secrets.token_bytes(KEY_BYTES))
            return self._keys.get(subject)

    def erase(self, subject: uuid.UUID) -> bool:
        with self._lock:
            self._keys[subject] = None
            if subject in self._erased:
                return False
            self._erased[subject] = datetime.now(UTC)
            return True

    def erased_at(self, subject: uuid.UUID) -> datetime | None:
        return self._erased.get(subject)

    def forget(self, subject: uuid.UUID) -> None:
        return None

    def close(self) -> None:
        return None


class KeyStore(Protocol):
    """What the mapper and the application need of a store of personal keys."""

    def cipher_for(self, subject: uuid.UUID, *, create: bool) -> AESGCM | None: ...
    def erase(self, subject: uuid.UUID) -> bool: ...
    def erased_at(self, subject: uuid.UUID) -> datetime | None: ...
    def forget(self, subject: uuid.UUID) -> None: ...
    def close(self) -> None: ...


# --- the mapper ---------------------------------------------------------------------------


@dataclass
class _Related:
    """Aggregate ids whose events were keyed to another subject (bounded, most recent)."""

    entries: OrderedDict[uuid.UUID, set[uuid.UUID]] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, subject: uuid.UUID, originator_id: Any) -> None:
        if subject == originator_id:
            return
        with self.lock:
            ids = self.entries.get(subject)
            if ids is None:
                ids = self.entries[subject] = set()
            ids.add(originator_id)
            self.entries.move_to_end(subject)
            while len(self.entries) > RELATED_ENTRIES:
                self.entries.popitem(last=False)

    def of(self, subject: uuid.UUID) -> set[uuid.UUID]:
        with self.lock:
            return set(self.entries.get(subject, ()))


class PersonalDataMapper(Mapper[uuid.UUID]):
    """The library's mapper, with each declared personal field sealed to its person's key.

    `keys` None: no service key is configured; fields are stored plain, and an envelope met
    on reading is an error (it cannot be opened). `encrypt` False stores new events plain
    (the benchmark's off switch) but still opens envelopes.
    """

    def __init__(
        self,
        transcoder: Transcoder,
        compressor: Compressor | None = None,
        cipher: Cipher | None = None,
        *,
        personal: PersonalData,
        keys: KeyStore | None,
        encrypt: bool = True,
    ) -> None:
        super().__init__(transcoder, compressor=compressor, cipher=cipher)
        self.personal = personal
        self.keys = keys
        self.encrypt = encrypt and keys is not None
        self.related = _Related()

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        if not self.encrypt:
            return super().to_stored_event(domain_event)
        topic = get_topic(type(domain_event))
        declaration = self._declaration(topic, vars(domain_event))
        if declaration is None:
            return super().to_stored_event(domain_event)
        state = dict(vars(domain_event))
        sealed = self._seal(declaration, topic, state, domain_event.originator_id)
        return self._stored(domain_event, topic, sealed)

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        """The library's `to_domain_event`, with personal fields opened before upcasting."""
        cls = resolve_topic(stored_event.topic)
        stored_state = stored_event.state
        try:
            if self.cipher:
                stored_state = self.cipher.decrypt(stored_state)
            if self.compressor:
                stored_state = self.compressor.decompress(stored_state)
            event_state: dict[str, Any] = self.transcoder.decode(stored_state)
        except Exception as e:
            msg = (
                f"Failed to deserialise state of stored event with "
                f"topic '{stored_event.topic}', "
                f"originator_id '{stored_event.originator_id}' and "
                f"originator_version {stored_event.originator_version}: {e}"
            )
            raise MapperDeserialisationError(msg) from e

        id_convertor = find_id_convertor(cls, cast(Hashable, type(stored_event.originator_id)))
        event_state["originator_id"] = id_convertor(stored_event.originator_id)
        event_state["originator_version"] = stored_event.originator_version
        declaration = self._declaration(stored_event.topic, event_state)
        if declaration is not None:
            self._open(declaration, stored_event, event_state)
        class_version = getattr(cls, "class_version", 1)
        from_version = event_state.pop("class_version", 1)
        while from_version < class_version:
            getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(event_state)
            from_version += 1

        domain_event = object.__new__(cls)
        object.__setattr__(domain_event, "__dict__", event_state)
        return domain_event

    # --- internals ------------------------------------------------------------------------

    def _declaration(self, topic: str, state: Mapping[str, Any]) -> PersonalFields | None:
        if topic == _SNAPSHOT_TOPIC:
            return self.personal.snapshots.get(str(state.get("topic")))
        return self.personal.events.get(topic)

    def _stored(self, domain_event: Any, topic: str, state: dict[str, Any]) -> StoredEvent:
        """The library's `to_stored_event` on an already copied (and sealed) state."""
        originator_id = state.pop("originator_id")
        originator_version = state.pop("originator_version")
        class_version = getattr(type(domain_event), "class_version", 1)
        if class_version > 1:
            state["class_version"] = class_version
        stored_state = self.transcoder.encode(state)
        if self.compressor:
            stored_state = self.compressor.compress(stored_state)
        if self.cipher:
            stored_state = self.cipher.encrypt(stored_state)
        return StoredEvent(
            originator_id=originator_id,
            originator_version=originator_version,
            topic=topic,
            state=stored_state,
        )

    def _seal(
        self, declaration: PersonalFields, topic: str, state: dict[str, Any], originator: Any
    ) -> dict[str, Any]:
        assert self.keys is not None
        target, prefix = state, ""
        if declaration.snapshot:
            target, prefix = dict(state["state"]), "state."
            state["state"] = target
        present = [name for name in declaration.fields if target.get(name) is not None]
        if not present:
            return state  # nothing personal in this one: no key is made for it
        subject = _subject(state, declaration)
        cipher = self.keys.cipher_for(subject, create=True)
        self.related.note(subject, originator)
        for name in present:
            value = target[name]
            if cipher is None:  # an erased person: their new data is not kept either
                target[name] = declaration.erased(name)
                DROPPED_WRITES.labels(topic).inc()
                continue
            nonce = secrets.token_bytes(NONCE_BYTES)
            aad = _aad(subject, topic, prefix + name)
            sealed = nonce + cipher.encrypt(nonce, self.transcoder.encode(value), aad)
            target[name] = {ENVELOPE: base64.b64encode(sealed).decode()}
        return state

    def _open(
        self, declaration: PersonalFields, stored_event: StoredEvent, state: dict[str, Any]
    ) -> None:
        target, prefix = state, ""
        if declaration.snapshot:
            target, prefix = state.get("state") or {}, "state."
        envelopes = [n for n in declaration.fields if _is_envelope(target.get(n))]
        if not envelopes:
            return  # stored plain (before encryption, or with it off)
        where = (
            f"{stored_event.topic} of {stored_event.originator_id} "
            f"v{stored_event.originator_version}"
        )
        if self.keys is None:
            msg = f"{where} holds encrypted personal data but no personal data key is configured"
            raise MapperDeserialisationError(msg)
        subject = _subject(state, declaration)
        cipher = self.keys.cipher_for(subject, create=False)
        self.related.note(subject, state["originator_id"])
        for name in envelopes:
            if cipher is None:
                target[name] = declaration.erased(name)
                ERASED_READS.labels(stored_event.topic).inc()
                continue
            try:
                sealed = base64.b64decode(target[name][ENVELOPE], validate=True)
                nonce, ciphertext = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
                plain = cipher.decrypt(
                    nonce, ciphertext, _aad(subject, stored_event.topic, prefix + name)
                )
            except (InvalidTag, ValueError) as e:
                msg = f"{where}: the personal field {name!r} does not open (tampered or moved)"
                raise MapperDeserialisationError(msg) from e
            target[name] = self.transcoder.decode(plain)


_SNAPSHOT_TOPIC = get_topic(Snapshot)


def _is_envelope(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and ENVELOPE in value


def _subject(state: Mapping[str, Any], declaration: PersonalFields) -> uuid.UUID:
    value = state.get(declaration.subject)
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        return uuid.UUID(value)
    msg = f"{declaration.topic}: its subject {declaration.subject!r} is not a UUID: {value!r}"
    raise PersonalDataError(msg)


def _aad(subject: uuid.UUID, topic: str, name: str) -> bytes:
    return b"|".join((subject.bytes, topic.encode(), name.encode()))


if __name__ == "__main__":
    print(new_service_key())
