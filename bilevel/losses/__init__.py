"""Losses, built from configs with ``_target_`` + ``_partial_: true``.

Inner losses map ``(output, batch)`` to one value per example ``[B]`` (the framework averages them
per domain with ``batch["domain"]``); outer losses map ``(output, batch)`` to a scalar.
"""

from bilevel.losses.classification import cross_entropy, per_example_cross_entropy

__all__ = ["cross_entropy", "per_example_cross_entropy"]
