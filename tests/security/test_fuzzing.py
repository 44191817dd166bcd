"""schemathesis against both OpenAPI documents, served for real on fresh databases.

Every generated request, valid or not, must get a documented answer that conforms to the
schema, and never a 5xx. Examples are bounded and derandomised: the run is quick and the
same on every machine (raise FUZZ_EXAMPLES locally to search harder).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.security.conftest import Account, Services, new_account

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("FUZZ_RANDOM") is None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzz_account(services: Services) -> Account:
    return new_account(services.auth_url)


def fuzz(schema: Any, mode: GenerationMode, headers: dict[str, str]) -> tuple[int, list[str]]:
    """Run every operation of `schema` with generated cases: (requests sent, failures)."""
    sent = 0
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @FUZZ_SETTINGS
        def run(case: Any) -> None:
            nonlocal sent
            sent += 1
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:
            pass  # nothing invalid to send (an operation without parameters or body)
        except Exception as exc:  # the failure of one operation must not hide the others
            failures.append(f"{operation.method.upper()} {operation.path} ({mode}): {exc}")
    return sent, failures


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("service", ["auth_svc", "user_svc"])
def test_every_generated_request_is_answered_as_documented(
    services: Services, fuzz_account: Account, service: str, mode: GenerationMode
) -> None:
    base_url = services.auth_url if service == "auth_svc" else services.users_url
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= (6 if service == "auth_svc" else 3)

    sent, failures = fuzz(schema, mode, fuzz_account.bearer)

    assert sent >= EXAMPLES
    assert not failures, "\n\n".join(failures)
