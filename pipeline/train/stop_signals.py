"""Stop on request: SIGUSR1 or SIGTERM (Slurm's warning before preemption or the time limit).

The training polls at the end of every step; a request makes it checkpoint on every rank and
exit with REQUEUE_EXIT_CODE. Code in another thread (where handlers cannot be set) calls
`request_stop()` itself.
"""

from __future__ import annotations

import os
import signal

STOP_SIGNALS = {signal.SIGUSR1, signal.SIGTERM}

_stop_requested = False


def request_stop(signum=None, frame=None) -> None:
    """Ask the running training to checkpoint at the end of this step and return REQUEUE_EXIT_CODE."""
    global _stop_requested
    _stop_requested = True


def requested() -> bool:
    return _stop_requested


def reset() -> None:
    """Forget an earlier request (a new training in the same process)."""
    global _stop_requested
    _stop_requested = False


def catch():
    """Route SIGUSR1/SIGTERM to request_stop; returns what `release` restores.

    The signals are also blocked in this thread, and the DataLoader workers forked from it inherit
    the mask: torchrun and Slurm signal whole process groups, and an unblocked worker dies of
    SIGTERM, taking the training down before it can checkpoint. Here they wait, pending, until
    `poll` collects them at the end of the step.
    """
    handlers = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    return handlers, signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def poll() -> None:
    if STOP_SIGNALS & signal.sigpending():
        received = set()
        while (info := signal.sigtimedwait(STOP_SIGNALS, 0)) is not None:
            received.add(signal.Signals(info.si_signo).name)
        # A line from every rank: across nodes, the log shows which ranks the signal reached.
        print(f"rank {os.environ.get('RANK', '0')}: {', '.join(sorted(received))} received", flush=True)
        request_stop()


def release(handlers, mask) -> None:
    poll()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
