"""Domain weights inside Hugging Face Trainer: time per step against the same plain Trainer run.

    python scripts/benchmarks/bench_hf_trainer.py          # SmolLM2-135M + LoRA (lm), ~6 min
    python scripts/benchmarks/bench_hf_trainer.py --quick     # a tiny random GPT-2, seconds

The lm_pretrained study's setting: SmolLM2-135M with LoRA on the query and value projections of
its last 4 layers, its six text domains in sequences of 33 tokens, batches of 8, Adam (lr 2e-3),
eager attention. Three runs of ``--steps`` steps each, over ``--rounds`` rounds in turn: the
plain ``Trainer``; ``DomainWeightsMixin`` with first_order and ``outer_every=5``; and with a
warm-started neumann of one iteration. The time of a step is taken between the trainer's
``on_step_end`` callbacks (after the outer update, where there is one), from the first full
window on; each figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import bilevel
from bilevel.integrations.hf import DomainWeightsMixin
from bilevel.solvers import build


def data(quick: bool):
    from datasets import Dataset

    if quick:
        g = torch.Generator().manual_seed(0)
        seqs = torch.randint(0, 64, (120, 33), generator=g)
        names = ["a", "b", "c"]
        domain = [names[i % 3] for i in range(120)]
        meta = torch.randint(0, 64, (16, 33), generator=g)
    else:
        from bilevel_experiments.lm_pretrained.builders import lm_pretrained

        built = lm_pretrained(seq_len=32, per_domain=600, meta_size=32, test_size=8)
        x, y = built.train["x"]["input_ids"], built.train["y"]
        seqs = torch.cat([x[:, :1], y], 1)
        names = built.names
        domain = [names[i] for i in built.train["domain"].tolist()]
        meta = torch.cat([built.meta["x"]["input_ids"][:, :1], built.meta["y"]], 1)
    train = Dataset.from_dict({"input_ids": seqs.tolist(), "domain": domain})
    return names, train, Dataset.from_dict({"input_ids": meta.tolist()})


def model(quick: bool):
    if quick:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2)
        config._attn_implementation = "eager"
        return GPT2LMHeadModel(config)
    from bilevel_experiments.lm_pretrained.model import SmolLM2

    torch.manual_seed(0)
    return SmolLM2(lora_layers=4).lm


def collate(examples):
    ids = torch.tensor([e["input_ids"] for e in examples])
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def one_run(kind: str, steps: int, quick: bool, names, train, meta, meta_batch: int) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    class Mixed(DomainWeightsMixin, Trainer):
        pass

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            max_steps=steps,
            learning_rate=2e-3,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
        )
        common = dict(model=model(quick), args=args, data_collator=collate, callbacks=[Clock()])
        if kind == "plain":
            trainer = Trainer(train_dataset=train.remove_columns("domain"), **common)
        else:
            solver = (
                build("first_order")
                if kind == "first_order"
                else build("neumann", iters=1, warm_start=True)
            )
            trainer = Mixed(
                train_dataset=train,
                domain_weights=bilevel.DomainWeights(names),
                meta_dataset=meta,
                solver=solver,
                outer_every=5,
                outer_optimizer=0.1,
                inner_lr=0.1,
                meta_batch_size=meta_batch,
                **common,
            )
        trainer.train()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return gaps[4:]  # from the first full window (steps 5..) on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--meta-batch",
        type=int,
        default=8,
        help="meta examples per hypergradient (8: the mixin's default, the train batch)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names, train, meta = data(args.quick)
    kinds = ["plain", "first_order", "neumann_warm"]
    per_step: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            gaps = one_run(kind, args.steps, args.quick, names, train, meta, args.meta_batch)
            per_step[kind].append(sum(gaps) / len(gaps))
    plain = statistics.median(per_step["plain"])
    where = "a tiny GPT-2" if args.quick else "SmolLM2-135M + LoRA"
    print(
        f"\n{where}, batches of 8 x 33 tokens, meta batches of {args.meta_batch}, "
        f"{args.steps} steps x {args.rounds} rounds, CPU"
    )
    print("| run | ms / step | x plain Trainer | hypergradient ms / outer step |")
    print("|---|---|---|---|")
    for kind in kinds:
        ms = statistics.median(per_step[kind]) * 1000
        extra = "" if kind == "plain" else f"{(ms - plain * 1000) * 5:.0f}"
        print(f"| {kind} | {ms:.0f} | {ms / (plain * 1000):.2f} | {extra} |")


if __name__ == "__main__":
    main()
