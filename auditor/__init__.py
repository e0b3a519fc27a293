"""auditor: a model robustness audit harness.

The public API::

    import auditor
    audit = auditor.scan("model.onnx", "mnist", access="hard-label", samples=100, out="out/scan")
    audit.results["robust_accuracy"]

``scan`` returns an :class:`AuditResult`; bad input raises :class:`AuditError`.
"""

from .errors import AuditError
from .models import load_model
from .scan import AuditResult, scan

__all__ = ["AuditError", "AuditResult", "load_model", "scan"]
