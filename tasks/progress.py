"""The training-progress artifact: a Trainer callback that mirrors training in the Prefect UI,
sending its updates from a background thread (:class:`ProgressSender`) so that a slow or dead
Prefect API never slows training down."""

from __future__ import annotations

import contextvars
import json
import math
import queue
import threading
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


#: seconds one progress call to the Prefect API may take (no client retries) before it is dropped
SEND_TIMEOUT_S = 5.0
#: seconds the end of training waits for the last progress update to be sent
FLUSH_TIMEOUT_S = 10.0


class ProgressSender:
    """Sends progress-artifact updates from a background thread, so training never waits on the API.

    ``submit(progress, description)`` never blocks: the queue holds one update and a newer one
    replaces a pending one (latest wins; the replaced one counts in ``superseded``). The
    sender thread creates the artifact on its first successful call, then updates it; each
    call runs with Prefect's client retries off and a ``timeout_s`` request timeout
    (``PREFECT_CLIENT_MAX_RETRIES=0``, ``PREFECT_API_REQUEST_TIMEOUT``), inside a copy of the
    context that created the sender (the task run the artifact belongs to). A failed call
    counts in ``failed``; the first failure logs one warning (the API is unreachable, updates
    are dropped, training goes on), the first success after failures one info line.
    :meth:`close` sends what is pending and waits at most ``flush_timeout_s``.

    Args:
        key: the artifact key; log: logger for the warning; timeout_s: seconds per API call.
    """

    def __init__(self, key: str, log: Any, timeout_s: float = SEND_TIMEOUT_S) -> None:
        self.key = key
        self.log = log
        self.timeout_s = timeout_s
        self.artifact_id = None
        self.sent = self.failed = self.superseded = 0
        self._down = False
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._closing = threading.Event()
        self._ctx = contextvars.copy_context()
        self._thread = threading.Thread(target=self._ctx.run, args=(self._loop,), name=f"progress-{key}", daemon=True)
        self._thread.start()

    def submit(self, progress: float, description: str) -> None:
        """Queue an update (percent 0..100, markdown description); never blocks."""
        item = (progress, description)
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.superseded += 1
                except queue.Empty:
                    pass

    @property
    def dropped(self) -> int:
        """Updates that never reached the API: replaced while pending, or failed."""
        return self.superseded + self.failed

    def _send(self, progress: float, description: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0, PREFECT_API_REQUEST_TIMEOUT: self.timeout_s}):
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(progress=progress, key=self.key, description=description)
            else:
                update_progress_artifact(artifact_id=self.artifact_id, progress=progress, description=description)

    def _loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            try:
                self._send(*item)
            except Exception as e:  # noqa: BLE001 - progress display must not break training
                self.failed += 1
                if not self._down:
                    self._down = True
                    self.log.warning(
                        "progress artifact %s: the Prefect API did not answer within %g s (%s: %s); progress "
                        "updates are dropped while it is unreachable, training goes on",
                        self.key, self.timeout_s, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "",
                    )
                continue
            self.sent += 1
            if self._down:
                self._down = False
                self.log.info("progress artifact %s: the Prefect API answers again (%d updates dropped so far)", self.key, self.dropped)

    def close(self, flush_timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Send what is pending, stop the thread; wait at most ``flush_timeout_s``. True when it ended."""
        self._closing.set()
        self._thread.join(flush_timeout_s)
        ended = not self._thread.is_alive()
        if self.dropped or not ended:
            self.log.info(
                "progress artifact %s: %d updates sent, %d dropped (%d replaced by newer, %d failed)%s",
                self.key, self.sent, self.dropped, self.superseded, self.failed,
                "" if ended else f"; the last one was not sent within {flush_timeout_s:g} s",
            )
        return ended


class PrefectProgressCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that mirrors training in a Prefect progress artifact.

    The artifact (created at ``on_train_begin`` under ``key``) shows ``global_step / max_steps``
    as the bar and, as its description, a table with the step, epoch, the latest logged loss,
    rewards/accuracies, rewards/margins, learning rate, elapsed time and an ETA (time per step
    since this run started x remaining steps, so a resumed run estimates from its own steps).
    It is updated at most every ``min_interval_s`` seconds and at the end. Each Trainer log dict
    goes to ``log`` (the run logger) as one line.

    Updates go through a :class:`ProgressSender` (background thread, one pending update, latest
    wins, ``send_timeout_s`` per call, no client retries): a training step never waits on the
    Prefect API, also when the server is down; dropped updates are counted and reported with one
    warning. ``on_train_end`` waits at most ``flush_timeout_s`` for the last update.
    """

    def __init__(
        self,
        key: str,
        description: str,
        log: Any,
        min_interval_s: float = 5.0,
        send_timeout_s: float = SEND_TIMEOUT_S,
        flush_timeout_s: float = FLUSH_TIMEOUT_S,
    ) -> None:
        self.key = key
        self.description = description
        self.log = log
        self.min_interval_s = min_interval_s
        self.send_timeout_s = send_timeout_s
        self.flush_timeout_s = flush_timeout_s
        self.sender: ProgressSender | None = None
        self._last = 0.0
        self._last_step = -1
        self._t0 = time.monotonic()
        self._step0 = 0
        self.latest: dict[str, Any] = {}

    @property
    def artifact_id(self):
        """The progress artifact's id once the sender created it (None before)."""
        return self.sender.artifact_id if self.sender is not None else None

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
        now = time.monotonic()
        if not force and (now - self._last < self.min_interval_s or state.global_step == self._last_step):
            return
        if self.sender is None:
            self.sender = ProgressSender(self.key, self.log, self.send_timeout_s)
        self.sender.submit(round(self._pct(state), 1), self.describe(state, done))
        self._last, self._last_step = now, state.global_step

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
        self.close()

    def close(self, flush_timeout_s: float | None = None) -> None:
        """Stop the sender thread after sending what is pending (at most ``flush_timeout_s``,
        default the callback's); idempotent, also called when training failed."""
        if self.sender is not None and self.sender._thread.is_alive():
            self.sender.close(self.flush_timeout_s if flush_timeout_s is None else flush_timeout_s)


def make_progress_callback(key: str, description: str = "training progress", min_interval_s: float = 5.0) -> PrefectProgressCallback | None:
    """A :class:`PrefectProgressCallback` logging to the run logger, or None outside Prefect."""
    if not in_prefect_run():
        return None
    return PrefectProgressCallback(key, description, run_logger(), min_interval_s)
