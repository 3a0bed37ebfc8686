"""Errors raised by the evaluation stage."""

from __future__ import annotations


class EvalInputError(ValueError):
    """Bad input to the evaluation stage.

    Raised for a model folder that does not exist or holds no model, a missing or
    malformed held-out file (the message names file, row and field), an lm-eval task
    that lm-eval does not know, a missing data file for an offline task, or a missing
    corpus file. :func:`orpo_core.evaluation.run_evaluation` raises it while
    validating, before any model is loaded.
    """
