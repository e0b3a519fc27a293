"""auditor: a model robustness audit harness.

The public API::

    import auditor
    audit = auditor.scan("model.onnx", "mnist", access="hard-label", samples=100, out="out/scan")
    audit.results["robust_accuracy"]
    hardened = auditor.harden("model.onnx", "mnist", eps=0.3, out="out/harden")
    hardened.record["after"]["robust_accuracy"]

``scan`` returns an :class:`AuditResult` and ``harden`` a :class:`HardenResult`;
bad input raises :class:`AuditError`.
"""

from .errors import AuditError
from .harden import HardenResult, harden
from .models import load_model
from .scan import AuditResult, scan

__all__ = ["AuditError", "AuditResult", "HardenResult", "harden", "load_model", "scan"]
