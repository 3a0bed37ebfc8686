"""Memory probes: process RSS and peak RSS, live-heap sampling, CUDA memory, and the per-step recorder."""

from __future__ import annotations

import os
import resource
import time
from typing import Any

def rss_now_mib() -> float:
    """Current resident set size of this process in MiB (``/proc/self/statm``; 0.0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return 0.0


def maxrss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """``getrusage(who).ru_maxrss`` in MiB (Linux reports KiB). For ``RUSAGE_CHILDREN`` it is the
    largest peak among waited-for children, not a sum."""
    return resource.getrusage(who).ru_maxrss / 1024.0


class HeapSampler:
    """Peak of the C heap's live bytes, sampled every ``interval_s`` by a daemon thread.

    glibc ``mallinfo2()``: ``uordblks`` (bytes in use in the main arena) + ``hblkhd`` (bytes in
    mmapped chunks, all threads). Unlike the RSS it does not count memory the allocator keeps
    after a free (fragmented heap pages), so on CPU it is what ``max_memory_allocated`` is on CUDA:
    the tensors alive at once. A short spike between two samples can be missed; other threads'
    arenas are not counted (PyTorch allocates tensors on the calling thread). ``available`` is
    False when not ``enabled`` (``mallinfo2`` takes the arena lock: sampling slows training) or
    without glibc >= 2.33."""

    def __init__(self, enabled: bool = True, interval_s: float = 0.002):
        import ctypes
        import threading

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                         "keepcost")]

        self._fn, self.available = None, False
        if enabled:
            try:
                self._fn = ctypes.CDLL("libc.so.6").mallinfo2
                self._fn.restype = MallInfo2
                self.available = True
            except (OSError, AttributeError):
                pass
        self.interval_s = interval_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_mib(self) -> float | None:
        if not self.available:
            return None
        m = self._fn()
        return (m.uordblks + m.hblkhd) / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now_mib())
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self.available:
            self.peak = self.now_mib()
            self._thread.start()

    def reset_peak(self) -> None:
        if self.available:
            self.peak = self.now_mib()

    def stop(self) -> float | None:
        if not self.available:
            return None
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now_mib())


def recorder(rec: dict[str, Any], heap_sampling: bool = False):
    """A ``TrainerCallback`` that appends timestamps and RSS (and the C heap's live bytes, see
    :class:`HeapSampler`) to ``rec``."""
    from transformers import TrainerCallback

    heap = HeapSampler(enabled=heap_sampling)

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec["t_train_begin"] = time.perf_counter()
            rec["rss"]["train_begin"] = {"now": rss_now_mib(), "max": maxrss_mib()}
            heap.start()

        def on_step_begin(self, args, state, control, **kw):
            _cuda_sync()
            rec["step_begin"].append(time.perf_counter())
            rec["step_begin_cpu"].append(time.process_time())

        def on_step_end(self, args, state, control, **kw):
            _cuda_sync()
            rec["step_end"].append(time.perf_counter())
            rec["step_cpu"].append(time.process_time())
            rec["step_rss"].append({"now": rss_now_mib(), "max": maxrss_mib(), "cuda_now": _cuda_now_mib()})
            if "state" not in rec:  # after the first optimizer step, before the next forward
                raw = rss_now_mib()
                trimmed = _malloc_trim()
                rec["state"] = {"rss_raw": raw, "rss": rss_now_mib() if trimmed else raw, "malloc_trim": trimmed,
                                "cuda": _cuda_now_mib(), "grads_absent_mib": _grads_absent_mib(kw.get("model")),
                                "heap": heap.now_mib()}
                heap.reset_peak()  # the peak from here on: steps 2.. (step 1 also builds the AdamW states)

        def on_train_end(self, args, state, control, **kw):
            _cuda_sync()
            rec["t_train_end"] = time.perf_counter()
            rec["rss"]["train_end"] = {"now": rss_now_mib(), "max": maxrss_mib()}
            rec["peak_cuda_mib"] = _cuda_peak_mib()
            rec["peak_heap_mib"] = heap.stop()

    return Recorder()


def _grads_absent_mib(model) -> float:
    """MiB of the trainable parameters whose ``.grad`` is None now (freed by
    ``zero_grad(set_to_none=True)``; the next backward allocates them again)."""
    if model is None:
        return 0.0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad and p.grad is None) / 2**20


def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _malloc_trim() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``), so the RSS measured
    next counts live memory, not activations freed but kept by the allocator. False where
    unavailable (non-glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # returns 1 if memory was released, 0 if none: both fine
        return True
    except (OSError, AttributeError):
        return False


def _cuda_now_mib() -> float | None:
    """``torch.cuda.memory_allocated()`` of this process in MiB (None without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.memory_allocated() / 2**20
    return None


def _cuda_peak_mib() -> float | None:
    """``torch.cuda.max_memory_allocated()`` of this process in MiB (None without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def new_record() -> dict[str, Any]:
    return {"step_begin": [], "step_end": [], "step_begin_cpu": [], "step_cpu": [], "step_rss": [], "batches": [],
            "losses": [], "rss": {}}


def record_batch(rec: dict[str, Any], lengths, padded_width: int) -> None:
    rows = [int(x) for x in lengths]
    rec["batches"].append({"lengths": rows, "tokens": sum(rows), "padded": padded_width * len(rows), "width": padded_width})
