"""Adapters that bring domain weights to other people's trainers: Hugging Face ``Trainer`` and
TRL's ``SFTTrainer`` (:mod:`bilevel.integrations.hf`). They use the public core, the solvers and
the distributed plumbing, never the command line; they sit beside the library's own trainer.
"""
