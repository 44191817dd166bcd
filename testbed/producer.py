"""A minimal event-sourced producer for testing the shared relay without a real service."""

from __future__ import annotations

import uuid

from servicekit.eventstore import EventSourcedApplication, TracedAggregate
from shared_contracts.events import AccountRegistered, ContractEvent, LoginSucceeded


class Member(TracedAggregate):
    class Joined(TracedAggregate.Created):
        email: str

        def apply(self, aggregate: Member) -> None:
            aggregate.email = self.email

    class Visited(TracedAggregate.Event):
        def apply(self, aggregate: Member) -> None:
            aggregate.visits += 1

    class SecretKept(TracedAggregate.Event):
        """A private event: never published."""

        secret: str

        def apply(self, aggregate: Member) -> None:
            pass

    email: str
    visits: int = 0

    @classmethod
    def join(cls, email: str) -> Member:
        return cls._create(cls.Joined, id=uuid.uuid4(), email=email)  # type: ignore[no-any-return]

    def visit(self) -> None:
        self.trigger_event(self.Visited)

    def keep_secret(self, secret: str) -> None:
        self.trigger_event(self.SecretKept, secret=secret)


class MemberApp(EventSourcedApplication):
    name = "members"


def to_contract(event: object) -> ContractEvent | None:
    if isinstance(event, Member.Joined):
        return AccountRegistered(user_id=event.originator_id, email=event.email)
    if isinstance(event, Member.Visited):
        return LoginSucceeded(user_id=event.originator_id)
    return None
