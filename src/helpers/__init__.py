"""Helpers for the T2I Agent Book: every stage's logic, imported by the notebooks and the `t2ibook` CLI."""
import logging

__version__ = "0.1.0"


class _DropTorchvisionNotice(logging.Filter):
    """transformers announces at import that torchvision (no CPU build here) is absent; the PIL fallback is fine."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionNotice())
