"""Evaluation stage: held-out preference metrics, perplexity, lm-eval tasks, base vs trained.

Entry point: :func:`run_evaluation` (contract section 5) writes ``eval.json``,
``eval.md`` and ``curves.png``. The pieces are usable on their own:

* :mod:`.preference` - :func:`load_pairs`, :func:`score_pairs`, :func:`preference_metrics`,
  :func:`bootstrap_ci` (accuracy, margin, log-odds, chosen perplexity with CIs);
* :mod:`.perplexity` - :func:`corpus_perplexity` (sliding window);
* :mod:`.harness` - :func:`resolve_tasks`, :func:`run_lm_eval` (offline lm-eval tasks);
* :mod:`.generation` - greedy answers to fixed prompts;
* :mod:`.loading` - :func:`validate_model_source`, :func:`load_eval_model`;
* :mod:`.report` - ``eval.json`` / ``eval.md`` / ``curves.png``.

Heavy libraries (torch, transformers, lm_eval) are imported lazily.
"""

from .errors import EvalInputError
from .harness import LOCAL_TASKS, ResolvedTask, resolve_tasks, resolve_tasks_dir, run_lm_eval
from .loading import ModelSource, load_eval_model, validate_model_source
from .perplexity import corpus_perplexity, sliding_windows
from .preference import PairScores, bootstrap_ci, load_pairs, log_odds, preference_metrics, score_pairs
from .report import load_log_history, plot_curves, render_markdown
from .runner import run_evaluation

__all__ = [
    "EvalInputError",
    "LOCAL_TASKS",
    "ModelSource",
    "PairScores",
    "ResolvedTask",
    "bootstrap_ci",
    "corpus_perplexity",
    "load_eval_model",
    "load_log_history",
    "load_pairs",
    "log_odds",
    "plot_curves",
    "preference_metrics",
    "render_markdown",
    "resolve_tasks",
    "resolve_tasks_dir",
    "run_evaluation",
    "run_lm_eval",
    "score_pairs",
    "sliding_windows",
    "validate_model_source",
]
