"""Prefect tasks of the ORPO pipeline: thin wrappers over ``orpo_core`` that pass paths, never tensors.

One task per stage (generate, prepare, tokenize, train, evaluate, export, push). The data,
model and export stages are cached on content (:mod:`orpo_core.runs.cache`) and persist small JSON
results; every task retries with exponential backoff, transient errors only
(:func:`orpo_core.runs.retry.is_transient`). :mod:`orpo_core.runs.lock` gives a run folder to
one run at a time; :mod:`orpo_core.runs.data_version` tells retraining whether the data changed.
"""

from .evaluate import evaluate_task
from .export import export_task
from .generate import generate_task
from .prepare import prepare_task
from .push import last_published_task, push_task, resolve_hf_token
from .tokenize_data import tokenize_task
from .train import train_task

__all__ = ["generate_task", "prepare_task", "tokenize_task", "train_task", "evaluate_task", "export_task", "push_task", "last_published_task", "resolve_hf_token"]
