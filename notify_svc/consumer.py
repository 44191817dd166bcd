"""`esctl consume notify_svc`: the notify projection's consumer and mail dispatcher process."""

from notify_svc.main import consume as main

__all__ = ["main"]
