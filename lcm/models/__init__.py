"""Models: backbone registry, the LCM head, baselines, losses and complexity counting.

Importing this package registers every architecture; build one with ``build_model``.
"""

from lcm.models import baselines, lcm  # noqa: F401  (import registers the architectures)
from lcm.models.registry import MODELS, ModelOutput, build_model, register_model

__all__ = ["MODELS", "ModelOutput", "build_model", "register_model"]
