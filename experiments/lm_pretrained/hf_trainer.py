"""The lm_pretrained study through TRL's ``SFTTrainer`` and ``DomainWeightsMixin``: the same data,
model and schedule as the native runs, trained by the Hugging Face trainer.

    python -m bilevel_experiments.lm_pretrained.hf_trainer --seeds 0 1 2

For each seed: ``uniform`` (the weights held at 1/6: a plain trainer on the mixture) and
``first_order`` (learned every 5 steps, the native preset's settings: inner_lr 0.1, Adam on
the logits at lr 0.1, meta batches of 16). SmolLM2-135M with LoRA on the last 4 layers, 80 steps
of 8 sequences of 33 tokens, Adam at lr 2e-3 with no schedule, as the native runs. The test
perplexity is measured on the seed's test set with the library's ``lm_metrics``. Results go to
``experiments/lm_pretrained/hf_trainer_results.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bilevel
from bilevel.data.evaluate import lm_metrics
from bilevel.files import write_text_atomic
from bilevel.integrations.hf import DomainWeightsMixin

HERE = Path(__file__).resolve().parent


def run(seed: int, learn: bool) -> dict:
    import trl
    from bilevel_experiments.lm_pretrained.builders import lm_pretrained
    from bilevel_experiments.lm_pretrained.model import SmolLM2, load_tokenizer
    from datasets import Dataset
    from transformers import set_seed

    set_seed(seed)
    data = lm_pretrained(seq_len=32, per_domain=600, meta_size=32, test_size=64, seed=seed)

    def rows(columns):
        return torch.cat([columns["x"]["input_ids"][:, :1], columns["y"]], 1).tolist()

    names = data.names
    train = Dataset.from_dict(
        {
            "input_ids": rows(data.train),
            "domain": [names[i] for i in data.train["domain"].tolist()],
        }
    )
    meta = Dataset.from_dict({"input_ids": rows(data.meta)})

    def collate(examples):
        ids = torch.tensor([e["input_ids"] for e in examples])
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    class SFT(DomainWeightsMixin, trl.SFTTrainer):
        pass

    torch.manual_seed(seed)
    wrapper = SmolLM2(lora_layers=4)
    weights = bilevel.DomainWeights(names)
    with tempfile.TemporaryDirectory() as out:
        config = trl.SFTConfig(
            output_dir=out,
            per_device_train_batch_size=8,
            max_steps=80,
            learning_rate=2e-3,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=seed,
            dataset_kwargs={"skip_prepare_dataset": True},
            remove_unused_columns=False,
        )
        trainer = SFT(
            model=wrapper.lm,
            args=config,
            # SFTTrainer loads a processor from the model's folder when given none, and the
            # GGUF model's folder has none
            processing_class=load_tokenizer(),
            train_dataset=train,
            data_collator=collate,
            domain_weights=weights,
            meta_dataset=meta,
            solver="first_order",
            outer_every=5 if learn else 10**9,
            outer_optimizer=0.1,
            inner_lr=0.1,
            meta_batch_size=16,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    test = lm_metrics(wrapper, data.test, torch.device("cpu"), chunk=16)
    return {
        "seed": seed,
        "method": "first_order" if learn else "uniform",
        "weights": weights.as_dict(),
        "test": test,
        "train_s": seconds,
    }


def made_on(seeds: list[int]) -> str:
    """Where and how the table was made (the study runner's first line)."""
    import transformers
    import trl

    from bilevel.logging.provenance import machine_line

    return (
        f"Command: `python -m bilevel_experiments.lm_pretrained.hf_trainer --seeds "
        f"{' '.join(map(str, seeds))}` on {machine_line()}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}. Mean ± std over seeds."
    )


def table(results: list[dict], names: list[str]) -> str:
    lines = [
        "| method (SFTTrainer + mixin) | test perplexity | weights (" + ", ".join(names) + ") |",
        "|---|---|---|",
    ]
    for method in ("uniform", "first_order"):
        rows = [r for r in results if r["method"] == method]
        ppl = [r["test"]["perplexity"] for r in rows]
        spread = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        mean_w = [statistics.mean(r["weights"][n] for r in rows) for n in names]
        lines.append(
            f"| {method} | {statistics.mean(ppl):.2f} ± {spread:.2f} | "
            + " ".join(f"{w:.3f}" for w in mean_w)
            + " |"
        )
    paired = [
        f["test"]["perplexity"] - u["test"]["perplexity"]
        for f in results
        if f["method"] == "first_order"
        for u in results
        if u["method"] == "uniform" and u["seed"] == f["seed"]
    ]
    if paired:
        lines.append("")
        lines.append(
            "first_order - uniform, per seed: "
            + ", ".join(f"{d:+.2f}" for d in paired)
            + f" (mean {statistics.mean(paired):+.2f})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("BILEVEL_THREADS", "2")))
    results = []
    for seed in args.seeds:
        for learn in (False, True):
            result = run(seed, learn)
            results.append(result)
            print(
                f"seed {seed} {result['method']}: perplexity "
                f"{result['test']['perplexity']:.2f} ({result['train_s']:.0f} s)",
                flush=True,
            )
    names = list(results[0]["weights"])
    write_text_atomic(HERE / "hf_trainer_results.json", json.dumps(results, indent=1))
    report = made_on(args.seeds) + "\n\n" + table(results, names)
    write_text_atomic(HERE / "hf_trainer_results.md", report + "\n")
    print(report)


if __name__ == "__main__":
    main()
