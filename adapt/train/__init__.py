"""Training: the loop (loop.py), the distributed backends (backends.py), the checkpoint format
(checkpoint.py), the run's one state record (state.py), reporting, stops and the final export."""

from .backends import cpu_has_native_bf16, deepspeed_config
from .checkpoint import complete_checkpoints
from .loop import train
from .state import TrainResult
from .stops import EXIT_CODES, EXIT_NONFINITE, Interrupted, NumericalFault

__all__ = ["EXIT_CODES", "EXIT_NONFINITE", "Interrupted", "NumericalFault", "TrainResult", "complete_checkpoints",
           "cpu_has_native_bf16", "deepspeed_config", "train"]
