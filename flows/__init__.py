"""Prefect flows of the ORPO pipeline.

* :func:`flows.pipeline.orpo_pipeline` — prepare -> tokenize -> train -> evaluate -> push.
* :func:`flows.pipeline.data_flow` — the data stages alone (CPU work pool).
* :func:`flows.pipeline.push_flow` — publish a trained run (``orpo push``).
* :func:`flows.sweep.ablation_sweep` — train + evaluate over a grid, one comparison table.
* :func:`flows.retrain.retrain` — scheduled retraining on fresh data, gated publication.

Submodules are imported on use so that ``flows.cli``'s stage commands do not import Prefect.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "orpo_pipeline": "flows.pipeline",
    "data_flow": "flows.pipeline",
    "push_flow": "flows.pipeline",
    "ablation_sweep": "flows.sweep",
    "retrain": "flows.retrain",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flows' has no attribute {name!r}")
