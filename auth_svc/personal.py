"""The personal fields of auth_svc's stored events, sealed per person (servicekit.shredding).

Once the person's key is destroyed these read as None (the snapshot's sessions as {}): an
erased account still loads, with no address, name, user agents, client IPs nor password
hash (an argon2 hash is derived from the person's secret: it goes with them).
"""

from __future__ import annotations

from auth_svc.domain import Account, EmailRegistration
from servicekit.shredding import PersonalData, personal_fields, snapshot_fields

PERSONAL_DATA = PersonalData(
    personal_fields(Account.Registered, "email", "display_name", "password_hash"),
    personal_fields(Account.PasswordChanged, "password_hash"),
    personal_fields(Account.PasswordRehashed, "password_hash"),
    personal_fields(Account.PasswordReset, "password_hash"),
    personal_fields(Account.LoginSucceeded, "user_agent", "client_ip"),
    personal_fields(Account.EmailVerified, "email"),
    # The registration is keyed by the address; its person is the account that claimed it.
    personal_fields(EmailRegistration.Claimed, "email", subject="account_id"),
    # Snapshots (every SNAPSHOT_EVERY events) carry the whole state: its personal parts are
    # the address, the name and the sessions (each with its user agent and client IP).
    snapshot_fields(Account, "email", "display_name", "password_hash", refresh_families={}),
)
