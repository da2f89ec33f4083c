"""The training loop: :class:`BilevelTrainer` runs windows of inner steps on the weighted
mixture, hands each window to the outer method, applies its update, and logs, evaluates,
checkpoints and stops on non-finite values; its settings are :class:`TrainerConfig`.

Everything only the loop uses lives here too: the inner loop (model, optimizer, samplers), the
checks made before training, the run's notes and records, checkpoint state and the stop on a
signal. It imports the methods, solvers, strategies, data, logging and the core, never the
command line.
"""

from bilevel.errors import NonFiniteError
from bilevel.trainer.config import TrainerConfig
from bilevel.trainer.trainer import BilevelTrainer

__all__ = ["BilevelTrainer", "NonFiniteError", "TrainerConfig"]
