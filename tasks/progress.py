"""The training-progress artifact: a Trainer callback that mirrors training in the Prefect UI."""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping

from transformers.trainer_callback import TrainerCallback  # the submodule: thread-safe, unlike the lazy top-level name

from orpo_core.io import fmt_value, json_safe, round_sig

from .logs import in_prefect_run, run_logger

PROGRESS_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "nll_loss", "log_odds_ratio", "eval_loss", "learning_rate")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def progress_markdown(step: int, max_steps: int, epoch: float | None, latest: Mapping[str, Any], elapsed_s: float, eta_s: float | None, done: bool = False) -> str:
    """The training-progress artifact's description: step / max steps, epoch, the latest logged
    loss and rewards/accuracies (4 significant digits), elapsed time and ETA, as a markdown table."""
    rows = [("step", f"{step} / {max_steps}" if max_steps else str(step))]
    if epoch is not None:
        rows.append(("epoch", f"{epoch:.2f}"))
    for k in PROGRESS_METRICS:
        if k in latest and latest[k] is not None:
            rows.append((k, fmt_value(float(latest[k]))))
    rows.append(("elapsed", _duration(elapsed_s)))
    rows.append(("ETA", "done" if done else _duration(eta_s)))
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


class PrefectProgressCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that mirrors training in a Prefect progress artifact.

    The artifact (created at ``on_train_begin`` under ``key``) shows ``global_step / max_steps``
    as the bar and, as its description, a table with the step, epoch, the latest logged loss,
    rewards/accuracies, rewards/margins, learning rate, elapsed time and an ETA (time per step
    since this run started x remaining steps, so a resumed run estimates from its own steps).
    It is updated at most every ``min_interval_s`` seconds and at the end. Each Trainer log dict
    goes to ``log`` (the run logger) as one line. Update failures only warn: progress display
    never breaks training.
    """

    def __init__(self, key: str, description: str, log: Any, min_interval_s: float = 5.0) -> None:
        self.key = key
        self.description = description
        self.log = log
        self.min_interval_s = min_interval_s
        self.artifact_id = None
        self._last = 0.0
        self._last_step = -1
        self._t0 = time.monotonic()
        self._step0 = 0
        self.latest: dict[str, Any] = {}

    def _pct(self, state) -> float:
        if not state.max_steps:
            return 0.0
        return max(0.0, min(100.0, 100.0 * state.global_step / state.max_steps))

    def _eta(self, state) -> float | None:
        done = state.global_step - self._step0
        if done <= 0 or not state.max_steps:
            return None
        return (time.monotonic() - self._t0) / done * max(0, state.max_steps - state.global_step)

    def describe(self, state, done: bool = False) -> str:
        """The artifact's description: the title and :func:`progress_markdown` of ``state``."""
        return f"{self.description}\n\n" + progress_markdown(
            state.global_step, state.max_steps, getattr(state, "epoch", None), self.latest, time.monotonic() - self._t0, self._eta(state), done
        )

    def _update(self, state, force: bool = False, done: bool = False) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        now = time.monotonic()
        if not force and (now - self._last < self.min_interval_s or state.global_step == self._last_step):
            return
        pct = round(self._pct(state), 1)
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(progress=pct, key=self.key, description=self.describe(state, done))
            else:
                update_progress_artifact(artifact_id=self.artifact_id, progress=pct, description=self.describe(state, done))
            self._last, self._last_step = now, state.global_step
        except Exception as e:  # noqa: BLE001 - progress display must not break training
            self.log.warning("progress artifact update failed: %s", e)

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._step0 = time.monotonic(), state.global_step
        self._update(state, force=True)

    def on_step_end(self, args, state, control, **kwargs):
        self._update(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.latest.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            shown = {k: (round_sig(v) if isinstance(v, float) else v) for k, v in logs.items()}
            self.log.info("step %d/%d %s", state.global_step, state.max_steps, json.dumps(json_safe(shown)))

    def on_train_end(self, args, state, control, **kwargs):
        self._update(state, force=True, done=True)


def make_progress_callback(key: str, description: str = "training progress", min_interval_s: float = 5.0) -> PrefectProgressCallback | None:
    """A :class:`PrefectProgressCallback` logging to the run logger, or None outside Prefect."""
    if not in_prefect_run():
        return None
    return PrefectProgressCallback(key, description, run_logger(), min_interval_s)
