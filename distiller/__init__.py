"""distiller: data-free distillation of vision-language models into compact CPU classifiers.

Importing this package is cheap: torch and friends are imported by the modules that need them.
"""
from runtime.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
