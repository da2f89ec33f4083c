"""Corpora on disk: memory against corpus size, time to the first step, loader throughput.

    python scripts/benchmarks/bench_corpus.py                  # 10 MB and 1 GB of jsonl (~5 min)
    python scripts/benchmarks/bench_corpus.py --sizes 10M 100M --quick

For each size it writes a corpus of four jsonl domains (documents of random words, files of at
most 64 MB) into a scratch folder, then runs ``bilevel-run data=files`` on it in a fresh process
(tiny_gpt, ``trainer.steps`` steps) and reports the process's peak RSS and the seconds from its
start to its first training step (the first record of ``metrics.jsonl``, logged every step).
The loader's throughput is timed in this process: the sampler alone, drawing batches of the
lm_pretrained shape (8 sequences of 32 tokens) with the byte tokenizer and, where the lm extra is
installed, with SmolLM2's tokenizer; against it, what the lm_pretrained model consumes per second
(tokens of its inner steps over its training time, ``experiment=lm_pretrained_files``, 10 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if so "
    "no will more about can its into than out them only some time could these two may first "
    "then do any like my now over such our man me even most made after also did many before "
    "must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here"
).split()


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def write_corpus(root: Path, total: int, domains: int = 4) -> dict[str, str]:
    """``domains`` jsonl domains of ``total`` bytes in all, plus a meta file; their globs."""
    rng = random.Random(0)
    pool = [
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 400)))})
        for _ in range(2000)
    ]
    globs = {}
    for d in range(domains):
        folder = root / f"d{d}"
        folder.mkdir(parents=True, exist_ok=True)
        left, part = total // domains, 0
        while left > 0:
            size = min(left, 64 << 20)
            with open(folder / f"part{part:03d}.jsonl", "w") as fh:
                written = 0
                while written < size:
                    line = pool[rng.randrange(len(pool))] + "\n"
                    fh.write(line)
                    written += len(line)
            left -= written
            part += 1
        globs[f"d{d}"] = str(folder / "*.jsonl")
    (root / "meta.jsonl").write_text("".join(pool[i] + "\n" for i in range(200)))
    return globs


def run_once(root: Path, globs: dict[str, str], steps: int) -> dict[str, float]:
    """``bilevel-run data=files`` in a fresh process: peak RSS (MB) and seconds to step 1."""
    out = root / "run"
    shutil.rmtree(out, ignore_errors=True)
    args = ["data=files", *(f"data.domains.{k}={v}" for k, v in globs.items())]
    args += [f"data.meta={root / 'meta.jsonl'}", "data.seq_len=128", "data.meta_size=32"]
    args += [f"trainer.steps={steps}", "trainer.batch_size=16", "trainer.log_every=1"]
    args += ["trainer.checkpoint_every=0", "trainer.progress=false", f"hydra.run.dir={out}"]
    wrapper = (
        "import resource, subprocess, sys, json, time\n"
        "t = time.time()\n"
        "child = subprocess.Popen([sys.executable, '-m', 'bilevel', *sys.argv[1:]],"
        " stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
        "metrics = sys.argv[-1].split('=', 1)[1] + '/metrics.jsonl'\n"
        "first = None\n"
        "while child.poll() is None:\n"
        "    if first is None:\n"
        "        try:\n"
        "            if any(json.loads(l).get('step', 0) >= 1 for l in open(metrics)):\n"
        "                first = time.time() - t\n"
        "        except (OSError, ValueError):\n"
        "            pass\n"
        "    time.sleep(0.01)\n"
        "err = child.stderr.read().decode()\n"
        "assert child.returncode == 0, err\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "total = time.time() - t\n"
        "print(json.dumps({'peak_rss_mb': rss, 'first_step_s': first, 'total_s': total}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *args], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loader_rate(globs: dict[str, str], meta: str, tokenizer: str, seconds: float = 10.0) -> float:
    """Tokens per second the sampler delivers (batches of 8 x 32 tokens), reading and
    tokenizing included."""
    import torch

    from bilevel.data.corpus import files

    data = files(globs, meta, tokenizer=tokenizer, seq_len=32, meta_size=8)
    sampler = data.train_sampler(len(globs), 8, "uniform", 0, 0, 1, 1.0, torch.device("cpu"))
    sampler.next()  # the reader thread starts
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = sampler.next()
        tokens += batch["y"].numel()
    rate = tokens / (time.perf_counter() - start)
    sampler.close()
    return rate


def model_rate() -> float | None:
    """Tokens per second the lm_pretrained model trains on (10 steps of 8 x 32 tokens)."""
    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.run(
            [sys.executable, "-m", "bilevel", "experiment=lm_pretrained_files"]
            + ["trainer.steps=10", "trainer.log_every=10", "trainer.eval_every=0"]
            + ["trainer.progress=false", f"hydra.run.dir={scratch}/run"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode:
            print(f"(no lm_pretrained model here: {proc.stderr.strip().splitlines()[-1]})")
            return None
        summary = json.loads((Path(scratch) / "run" / "summary.json").read_text())
    return 10 * 8 * 32 / summary["wall_time_s"]


def smollm2_tokenizer() -> str | None:
    """The SmolLM2 tokenizer's folder (written by the lm_pretrained_files study), if any."""
    try:
        from bilevel_experiments.lm_pretrained.files import write_corpora
    except ImportError:
        return None
    base = Path(os.path.expanduser(os.environ.get("BILEVEL_CACHE", "~/.cache/bilevel")))
    try:
        return str(write_corpora(base / "lm_pretrained_corpus") / "tokenizer")
    except Exception:  # noqa: BLE001 - the lm extra is optional
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["10M", "1G"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dir", help="scratch folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="no throughput against the model")
    args = parser.parse_args()
    scratch = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    rows = []
    try:
        for text in args.sizes:
            size = parse_size(text)
            root = scratch / text
            start = time.time()
            globs = write_corpus(root, size)
            print(f"wrote {text} in {time.time() - start:.0f} s", flush=True)
            result = run_once(root, globs, args.steps)
            rows.append((text, result))
            print(f"{text}: {json.dumps(result)}", flush=True)
        print("\n| corpus | peak RSS MB | seconds to the first step | run seconds |")
        print("|---|---|---|---|")
        for text, r in rows:
            print(
                f"| {text} | {r['peak_rss_mb']:.0f} | {r['first_step_s']:.1f} | "
                f"{r['total_s']:.1f} |"
            )
        last = scratch / args.sizes[-1]
        globs = {f"d{d}": str(last / f"d{d}" / "*.jsonl") for d in range(4)}
        rates = {"bytes": loader_rate(globs, str(last / "meta.jsonl"), "bytes")}
        tokenizer = smollm2_tokenizer()
        if tokenizer:
            rates["SmolLM2"] = loader_rate(globs, str(last / "meta.jsonl"), tokenizer)
        consumed = None if args.quick else model_rate()
        print(f"\nloader over {args.sizes[-1]}, batches of 8 x 32 tokens:")
        for name, rate in rates.items():
            ratio = f" = {rate / consumed:.0f}x the model's" if consumed else ""
            print(f"  {name} tokenizer: {rate:,.0f} tokens/s{ratio}")
        if consumed:
            print(f"  lm_pretrained (SmolLM2-135M + LoRA) trains on {consumed:,.0f} tokens/s")
        print(f"(peak RSS of this process: {resource.getrusage(0).ru_maxrss / 1024:.0f} MB)")
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
