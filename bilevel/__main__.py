"""``python -m bilevel [overrides]`` (also what ``torchrun -m bilevel`` runs)."""

from bilevel.cli import main

main()
