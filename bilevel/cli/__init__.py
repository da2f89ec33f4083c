"""The command line: ``bilevel-run`` (the Hydra app over ``configs/``), its run and sweep
folders, the checks made before Hydra starts, ``resume=``, and the sweep tables
(``bilevel-collect``). It sits on top: it builds everything from the config and runs the
trainer; nothing in the library imports it.
"""

from bilevel.cli.app import format_summary, main, quiet_third_parties, run
from bilevel.cli.build import make_trainer, seed_everything
from bilevel.cli.preflight import config_dir, preflight

__all__ = [
    "config_dir",
    "format_summary",
    "main",
    "make_trainer",
    "preflight",
    "quiet_third_parties",
    "run",
    "seed_everything",
]
