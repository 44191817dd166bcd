"""`esctl consume integration_svc`: the webhook projection's consumer and dispatcher process."""

from integration_svc.main import consume as main

__all__ = ["main"]
