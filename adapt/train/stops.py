"""How a run stops early: on SIGTERM/SIGINT (with a checkpoint) or on non-finite numbers."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import torch

from .collectives import all_reduce_sum

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + signal number, as shells report them
EXIT_NONFINITE = 3  # stopped on non-finite numbers (bad input is 2; signals 130 and 143)


class Interrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; `exit_code` tells which signal."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at {checkpoint}; continue with resume=auto")
        self.exit_code = EXIT_CODES[signum]
        self.checkpoint = checkpoint


class NumericalFault(Interrupted):
    """Training stopped because losses, gradients or weights were no longer finite numbers."""

    def __init__(self, message: str, checkpoint: Path | None):
        Exception.__init__(self, message)
        self.exit_code = EXIT_NONFINITE
        self.checkpoint = checkpoint


class Stopping(Exception):
    """A signal cut a long phase short (a validation, the micro-batches of a step); the loop ends the run there."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and exits. A second
    signal of the same kind gets the default behaviour (kill), for when saving hangs."""

    def __init__(self):
        self.signum = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in EXIT_CODES}

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    def agreed(self, device) -> int | None:
        """The signal to stop on, the same on every process: one seen by any process stops them all.

        The decision rests on the reduced flag alone. A signal that lands while this process waits in the
        all-reduce sets `signum` after its vote was cast: acting on it now would stop this process while
        the others, which never saw it, go on into the next step's collectives. It counts at the next step.
        """
        local = self.signum
        seen = all_reduce_sum(torch.tensor([float(local is not None)], device=device)).item() > 0
        if not seen:
            return None
        return local if local is not None else signal.SIGTERM

    def check(self, device) -> None:
        """Raise `Stopping` once any process has seen a signal. A vote (`agreed`): every process calls it at
        the same point, so all of them leave the phase together."""
        signum = self.agreed(device)
        if signum is not None:
            raise Stopping(signum)

    @contextlib.contextmanager
    def checked_before_every_call(self, module, device):
        """While the block runs, every call of `module` first `check`s. Given a model's first decoder layer,
        which every forward passes (the sampler's and the ELBO's call the layers, not the model), a phase
        of many forwards (a validation of many Monte Carlo samples) stops within one forward of a signal."""
        handle = module.register_forward_pre_hook(lambda module, args: self.check(device))
        try:
            yield
        finally:
            handle.remove()

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
