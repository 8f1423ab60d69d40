"""adapter: make retrieval better on your own data without rebuilding your vector index."""

from adapter.config import Config
from adapter.errors import AdapterError

__all__ = ["AdapterError", "Config"]
__version__ = "0.1.0"
