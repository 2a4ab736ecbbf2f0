"""Built-in compression methods: every module in this package registers its method on import."""

import pkgutil
from importlib import import_module

from .lowrank import LowRankConfig

for _info in pkgutil.iter_modules(__path__):
    import_module(f"{__name__}.{_info.name}")

__all__ = ["LowRankConfig"]
