"""Domain weights inside Hugging Face ``Trainer`` on a tiny random GPT-2 with two domains, one
of them label noise: run it in one process, or on several with ``accelerate launch`` or
``torchrun`` (every rank ends with the same weights).

    python examples/hf_trainer_ddp.py out/
    torchrun --nproc_per_node=2 examples/hf_trainer_ddp.py out/

Each process writes ``<out>/weights-<rank>.json``.
"""

import json
import os
import random
import sys

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import bilevel
from bilevel.integrations.hf import DomainWeightsMixin

V = 16


class MyTrainer(DomainWeightsMixin, Trainer):
    pass


def rows(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(V // 2) for _ in range(16)] for _ in range(n)]


def collate(examples):
    ids = torch.tensor([e["input_ids"] for e in examples])
    labels = torch.tensor([e.get("labels", e["input_ids"]) for e in examples])
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def main(out: str) -> None:
    rng = random.Random(5)
    clean, noisy = rows(200, 0), rows(200, 1)
    train = Dataset.from_dict(
        {
            "input_ids": clean + noisy,
            "labels": clean + [[rng.randrange(V) for _ in r] for r in noisy],  # label noise
            "domain": ["clean"] * 200 + ["noise"] * 200,
        }
    )
    meta = Dataset.from_dict({"input_ids": rows(32, 9)})
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2, attn_implementation="eager"
    )
    trainer = MyTrainer(
        model=GPT2LMHeadModel(config),
        args=TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            max_steps=30,
            learning_rate=2e-3,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=train,
        data_collator=collate,
        domain_weights=bilevel.DomainWeights(["clean", "noise"]),
        meta_dataset=meta,
        outer_every=5,
        outer_optimizer=0.2,
    )
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"weights-{rank}.json"), "w") as fh:
        json.dump(trainer.domain_weights.value().tolist(), fh)


if __name__ == "__main__":
    main(sys.argv[1])
