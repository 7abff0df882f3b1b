"""Stopping a run cleanly when the machine is being taken away (spot GPUs, preemptible TPU VMs) or on Ctrl-C.

A preemption notice is SIGTERM followed by a grace period. `StopRequest` turns SIGTERM and SIGINT into a
request the training loop sees after the step it is running: it saves a checkpoint and exits with
EXIT_PREEMPTED, and the same command resumes from that checkpoint. A second Ctrl-C stops at once.

On several processes (a pod) JAX's coordination service receives the notice and every process must stop
after the same step: the loop asks JAX's preemption sync point (`reached_preemption_sync_point`) instead of
looking at its own signals, which JAX's service handles.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("pdlm-train")

EXIT_PREEMPTED = 4  # stopped by SIGTERM / SIGINT / a preemption notice after saving a checkpoint


class StopRequest:
    """Context manager: while active, SIGTERM and SIGINT set `signalled` instead of ending the process
    (single-process runs, from the main thread; elsewhere it does nothing)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, multi_process: bool = False):
        self.signalled: str | None = None  # the name of the signal received
        self.multi_process = multi_process
        self.active = not multi_process and threading.current_thread() is threading.main_thread()
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signalled and signum == signal.SIGINT:  # a second Ctrl-C: the user does not want to wait
            signal.default_int_handler(signum, frame)
        self.signalled = signal.Signals(signum).name
        log.warning("%s received: stopping after this step, saving a checkpoint (rerun the same command to "
                    "resume)", self.signalled)

    def __enter__(self) -> StopRequest:
        if self.active:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def should_stop(self, step: int) -> bool:
        """After `step`: stop for a signal (one process) or at JAX's preemption sync point (every process
        answers alike)."""
        return self.signalled is not None or (self.multi_process and _reached_preemption(step))


def _reached_preemption(step: int) -> bool:
    from jax.experimental import multihost_utils

    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # JAX's preemption service is off (jax_enable_preemption_service)
        return False
