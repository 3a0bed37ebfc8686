"""orpo_core: data, ORPO loss and trainer, evaluation and model cards (no Prefect here)."""

__version__ = "0.1.0"
