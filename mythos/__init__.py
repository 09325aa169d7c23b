"""mythos: a Recurrent-Depth Transformer in single-device PyTorch (no Ray, no torch.distributed)."""

from .config import ConfigError, MythosConfig
from .kv_cache import CacheError, KVCache
from .model import Mythos, MythosOutput

__all__ = ["ConfigError", "MythosConfig", "CacheError", "KVCache", "Mythos", "MythosOutput"]
from .variants import VARIANTS, get_variant  # noqa: E402

__all__ += ["VARIANTS", "get_variant"]
