"""Guardrail hooks at the gateway: input hooks that allow, rewrite or reject a prepared request,
and output hooks that redact or stop each choice's text through a bounded look-ahead window.
Chosen by `--guardrails` (loading.py), registered by entry point; built-ins in redactor.py and
blocklist.py. With none configured the request path does no guardrail work at all."""

from tandem.gateway.guardrails.hooks import (
    ALLOW,
    Allow,
    GuardInput,
    InputHook,
    InputVerdict,
    OutputAction,
    OutputHook,
    Reject,
    Rewrite,
    Span,
)
from tandem.gateway.guardrails.loading import (
    ENTRY_POINT_GROUP,
    NO_GUARDRAILS,
    Guardrails,
    guard_input,
    load_guardrails,
    parse_guardrails,
)
from tandem.gateway.guardrails.window import OutputWindow, Released

__all__ = [
    "ALLOW",
    "ENTRY_POINT_GROUP",
    "NO_GUARDRAILS",
    "Allow",
    "GuardInput",
    "Guardrails",
    "InputHook",
    "InputVerdict",
    "OutputAction",
    "OutputHook",
    "OutputWindow",
    "Reject",
    "Released",
    "Rewrite",
    "Span",
    "guard_input",
    "load_guardrails",
    "parse_guardrails",
]
