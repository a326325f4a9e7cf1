"""Re-export of :mod:`data_prepare.resources` (the shipped model, corpus and cache dir).

The code lives at the bottom of the import layering so that ``deltakv`` and ``data_prepare`` can use
it without importing ``sparse_engine``; this shim keeps ``sparse_engine.shipped`` imports working.
"""

from data_prepare.resources import *  # noqa: F401,F403
from data_prepare.resources import (  # noqa: F401
    MODEL_ALIASES,
    SHIPPED_MODEL_NAME,
    cache_dir,
    resolve_model_path,
    shipped_articles,
    shipped_model_dir,
    shipped_text_path,
)
