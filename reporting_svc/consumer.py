"""`esctl consume reporting_svc`: the reporting projection's consumer process."""

from reporting_svc.main import consume as main

__all__ = ["main"]
