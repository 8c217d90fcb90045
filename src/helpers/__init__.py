"""Helpers for the T2I Agent Book: every stage's logic, imported by the notebooks and the `t2ibook` CLI."""
import logging
import warnings

__version__ = "0.1.0"


class _DropTorchvisionNotice(logging.Filter):
    """transformers announces at import that torchvision (no CPU build here) is absent; the PIL fallback is fine."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionNotice())

# diffusers' SDE samplers ask torchsde's Brownian tree for the noise at the last sigma, which float32 rounding puts a
# hair past the tree's end (tb=11.154208 > t1=11.154207); torchsde clamps it and warns on every image
warnings.filterwarnings("ignore", message=r"Should have tb<=t1 but got", module=r"torchsde\.")
