"""DreamPRM, faithfully, on a pretrained encoder: arithmetic word problems written as text steps.

A problem starts from a number (1..9) and applies 3 to 5 additions or subtractions of 1..5, staying
within 0..20. A *policy* writes a solution step by step as text, each step worded in one of four
ways ("Start 7. Step 1: 7 + 3 = 10. Step 2: take 4 from 10 to get 6."), so that its right solutions
differ from each other as a real policy's do (with one wording, every right solution of a problem is
the same text with one score, and best-of-N turns into a contest between that score and the maximum
over the varied wrong ones). A step goes wrong by starting from a value other than the previous
step's result (a carry slip of 1 or 2, with probability ``error_rate`` per step); one *trap* step
per problem takes a habitual slip with probability ``trap_rate``, so wrong answers cluster, as a
real policy's do, and majority vote can be fooled. A wrong step's own arithmetic is right (from the
wrong value), and later steps build on it: the final answer is wrong exactly when some step is
wrong. Checking a step is comparing the value it starts from with the previous result, which a small
pretrained encoder learns from a few thousand labelled steps; exact arithmetic checks (an earlier
version) it did not learn at the scale a CPU study affords.

Step labels are Monte-Carlo estimates, as DreamPRM's sources are: the label of step s is the
fraction of k rollouts, continued from the solution's first s steps by the same policy, that end at
the right answer (0 once the prefix holds a wrong step). The training domains differ in the quality
of those labels, like DreamPRM's sources:

=============== ======================================================================
``mc16``         16 rollouts per step (the best labels)
``mc2``          2 rollouts per step (labels in {0, 0.5, 1}: noisy)
``optimistic``   a biased annotator: a wrong step is called right (label 1) 60% of the time
``mislabeled``   40% of the step labels replaced by 1 - label
``trivial``      16 rollouts, but problems of 1 or 2 small additions (easy, uninformative)
=============== ======================================================================

No domain's labels are the meta target. The meta set holds, for ``meta_problems`` problems,
``meta_candidates`` policy solutions with their final-answer correctness only (what DreamPRM's
aggregation loss uses); the test set holds ``candidates`` solutions of each of ``test_problems`` new
problems, for best-of-N selection. ``info["label_error"]`` is each domain's mean absolute error
against the exact probability of success (the true quality of its labels)."""

from __future__ import annotations

import torch
from torch import nn

from bilevel import module_state
from bilevel.data.best_of_n import selection_accuracy
from bilevel.data.checks import check_counts, check_fractions, check_seed
from bilevel.data.columns import Columns, domain_columns
from bilevel.data.domain_data import DomainData
from bilevel.errors import ConfigError
from bilevel.functional import forward_batch
from bilevel.losses.prm import trajectory_logits

__all__ = [
    "DOMAINS",
    "best_of_n",
    "label_features",
    "prm_text",
    "sample_problems",
    "write_solutions",
]

DOMAINS = ("mc16", "mc2", "optimistic", "mislabeled", "trivial")
N_VALUES = (1, 4, 16, 32)
OPS = ("+", "-")


def sample_problems(n: int, gen: torch.Generator, trivial: bool = False) -> list[dict]:
    """``n`` problems: a start value, a list of (op, operand) and a trap step."""
    problems = []
    for _ in range(n):
        if trivial:
            steps = 1 + int(torch.randint(0, 2, (1,), generator=gen))
            start = int(torch.randint(1, 6, (1,), generator=gen))
            ops = [("+", int(torch.randint(1, 4, (1,), generator=gen))) for _ in range(steps)]
        else:
            # small numbers (0..20, operands 1..5): a table of facts an encoder can learn to
            # check from a few thousand steps
            steps = int(torch.randint(3, 6, (1,), generator=gen))
            start = int(torch.randint(1, 10, (1,), generator=gen))
            ops, value = [], start
            for _ in range(steps):
                a = int(torch.randint(1, 6, (1,), generator=gen))
                op = OPS[int(torch.randint(0, 2, (1,), generator=gen))]
                if _apply(value, op, a) < 0 or _apply(value, op, a) > 20:
                    op = "+" if op == "-" else "-"
                value = _apply(value, op, a)
                ops.append((op, a))
        trap = int(torch.randint(0, len(ops), (1,), generator=gen))
        shift = 1 if float(torch.rand(1, generator=gen)) < 0.5 else -1
        problems.append({"start": start, "ops": ops, "trap": trap, "trap_shift": shift})
    return problems


def _apply(value: int, op: str, a: int) -> int:
    return value + a if op == "+" else value - a if op == "-" else value * a


def write_solutions(
    problem: dict, count: int, error_rate: float, gen: torch.Generator, trap_rate: float = 0.0
) -> list:
    """``count`` policy solutions: per step (value it starts from, op, operand, result, prefix
    right?). A step goes wrong by starting from a value other than the previous result (a carry
    slip of 1 or 2, with probability ``error_rate``; at the problem's trap step a habitual one,
    with probability ``trap_rate``); its own arithmetic is then done right, from the wrong value,
    and every later step builds on it."""
    truth, value = [problem["start"]], problem["start"]
    for op, a in problem["ops"]:
        value = _apply(value, op, a)
        truth.append(value)
    out = []
    for _ in range(count):
        carried, steps, wrong_so_far = problem["start"], [], False
        trapped = float(torch.rand(1, generator=gen)) < trap_rate
        for s, (op, a) in enumerate(problem["ops"]):
            start = carried
            if trapped and s == problem["trap"]:
                start = carried + problem["trap_shift"]
            elif float(torch.rand(1, generator=gen)) < error_rate:
                start = carried + [-2, -1, 1, 2][int(torch.randint(0, 4, (1,), generator=gen))]
            result = _apply(start, op, a)
            if wrong_so_far and result == truth[s + 1]:
                start, result = carried, _apply(carried, op, a)  # never back onto the truth
            wrong_so_far = wrong_so_far or start != carried
            steps.append((start, op, a, result, not wrong_so_far))
            carried = result
        # the policy words each step in one of a few ways, so its right solutions differ too
        templates = torch.randint(0, len(TEMPLATES), (len(steps),), generator=gen).tolist()
        out.append(
            {
                "steps": steps,
                "answer": carried,
                "correct": carried == truth[-1],
                "templates": templates,
            }
        )
    return out


def _success(problem: dict, s: int, error_rate: float, trap_rate: float) -> float:
    """Probability that the policy, continuing after step s with a right prefix, ends right."""
    p = 1.0
    for j in range(s + 1, len(problem["ops"])):
        p *= (1 - error_rate) * ((1 - trap_rate) if j == problem["trap"] else 1.0)
    return p


def mc_labels(
    problem: dict,
    solution: dict,
    k: int,
    error_rate: float,
    trap_rate: float,
    gen: torch.Generator,
) -> list[float]:
    """Monte-Carlo step labels: the fraction of k policy rollouts from each prefix that end at
    the right answer (0 once the prefix holds a wrong step)."""
    labels = []
    for s, (*_, prefix_right) in enumerate(solution["steps"]):
        if not prefix_right:
            labels.append(0.0)
            continue
        p = torch.tensor(_success(problem, s, error_rate, trap_rate))
        labels.append(float(torch.binomial(torch.tensor(float(k)), p, generator=gen)) / k)
    return labels


def exact_labels(problem: dict, solution: dict, error_rate: float, trap_rate: float) -> list:
    return [
        _success(problem, s, error_rate, trap_rate) if right else 0.0
        for s, (*_, right) in enumerate(solution["steps"])
    ]


TEMPLATES = (
    "Step {k}: {v} {op} {a} = {r}.",
    "Step {k}: {v} {op} {a} gives {r}.",
    "Step {k}: {r} = {v} {op} {a}.",
    "Step {k}: {word} {a} {prep} {v} to get {r}.",
)
WORD = {"+": ("add", "to"), "-": ("take", "from")}


def _step_text(s: int, stated: int, op: str, a: int, result: int, template: int = 0) -> str:
    word, prep = WORD[op]
    return TEMPLATES[template].format(k=s + 1, v=stated, op=op, a=a, r=result, word=word, prep=prep)


class _Tokens:
    """Question + step texts -> input ids with the token position that ends each step."""

    def __init__(self, tokenizer, max_len: int, max_steps: int) -> None:
        self.tok, self.max_len, self.max_steps = tokenizer, max_len, max_steps
        self.cache: dict[str, list[int]] = {}
        #: solutions whose last step ends past max_len, and the longest length needed
        self.cut, self.longest = 0, 0

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]

    def encode(self, problem: dict, solution: dict) -> tuple[list[int], list[int]]:
        # "Start 7." then the steps: each step states the value it starts from, so checking it
        # is comparing that value with the previous step's result (or the start); the problem's
        # full text would double the length, and the encoder's cost with it
        ids = [self.tok.cls_token_id, *self.ids(f"Start {problem['start']}.")]
        positions = []
        for s, (stated, op, a, result, _) in enumerate(solution["steps"]):
            ids += self.ids(_step_text(s, stated, op, a, result, solution["templates"][s]))
            positions.append(min(len(ids), self.max_len) - 1)
        self.cut += len(ids) > self.max_len
        self.longest = max(self.longest, len(ids))
        return ids[: self.max_len], positions

    def check_fits(self) -> None:
        """A step cut off by max_len would be scored at the last token kept, from a text that
        does not hold it, and trained against its label all the same: refuse instead."""
        if self.cut:
            raise ConfigError(
                "data.max_len",
                f"{self.max_len} tokens cut the steps of {self.cut} solutions (the longest needs "
                f"{self.longest}): use data.max_len>={self.longest}",
            )


def _columns(rows: list[tuple], tokens: _Tokens) -> Columns:
    b, t, s = len(rows), tokens.max_len, tokens.max_steps
    input_ids = torch.zeros(b, t, dtype=torch.int64)
    attention = torch.zeros(b, t, dtype=torch.int64)
    positions = torch.zeros(b, s, dtype=torch.int64)
    mask = torch.zeros(b, s)
    labels = torch.zeros(b, s)
    outcome, answer, problem_id = (
        torch.zeros(b),
        torch.zeros(b, dtype=torch.int64),
        torch.zeros(b, dtype=torch.int64),
    )
    for i, (problem, solution, step_labels, pid) in enumerate(rows):
        ids, pos = tokens.encode(problem, solution)
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        positions[i, : len(pos)] = torch.tensor(pos)
        mask[i, : len(pos)] = 1
        labels[i, : len(step_labels)] = torch.tensor(step_labels)
        outcome[i] = float(solution["correct"])
        answer[i] = solution["answer"]
        problem_id[i] = pid
    return {
        "x": {"input_ids": input_ids, "attention_mask": attention, "step_positions": positions},
        "step_labels": labels,
        "step_mask": mask,
        "outcome": outcome,
        "answer": answer,
        "problem": problem_id,
    }


def label_features(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What an instance net sees of a training example besides its loss (DreamPRM-1.5 weighs
    instances by what they are): its mean step label, the share of steps labelled 0, its length
    (steps / 6), and how often a label rises after a 0 (a Monte-Carlo label never does: once a
    prefix holds a wrong step, every later prefix does too; flipped labels do). ``[N, 4]``."""
    steps = mask.sum(1).clamp_min(1)
    mean = (labels * mask).sum(1) / steps
    zeros = ((labels == 0) & (mask > 0)).sum(1) / steps
    after_zero = (labels[:, :-1] == 0) & (labels[:, 1:] > 0) & (mask[:, 1:] > 0)
    rises = after_zero.sum(1) / steps
    return torch.stack([mean, zeros, steps / 6, rises], 1).float()


@torch.no_grad()
def best_of_n(
    model: nn.Module,
    columns: Columns,
    device: torch.device,
    aggregation: str = "mean_logodds",
    chunk: int = 256,
) -> dict[str, float]:
    """Best-of-N accuracy of the PRM, majority vote and random choice (N in 1, 4, 16, 32;
    :func:`bilevel.data.best_of_n.selection_accuracy`), scored in chunks of ``chunk``."""
    from bilevel.data.columns import chunks

    with module_state.evaluation(model):
        scores = torch.cat(
            [
                trajectory_logits(forward_batch(model, c), c, aggregation)
                for c in chunks(columns, chunk)
            ]
        )
    candidates = int(columns["candidates"][0])
    return selection_accuracy(scores, columns["outcome"], columns["answer"], candidates, N_VALUES)


def prm_text(
    per_domain: int = 400,
    error_rate: float = 0.1,
    trap_rate: float = 0.5,
    meta_problems: int = 40,
    meta_candidates: int = 8,
    test_problems: int = 100,
    candidates: int = 32,
    max_len: int = 64,
    tokenizer: str | None = None,
    seed: int = 0,
) -> DomainData:
    """Build the five label-quality domains, the outcome-only meta set and the best-of-N test."""
    check_fractions(error_rate=(error_rate, "(0, 1)"), trap_rate=(trap_rate, "[0, 1)"))
    check_counts(
        per_domain=(per_domain, 1),
        meta_problems=(meta_problems, 1),
        meta_candidates=(meta_candidates, 1),
        test_problems=(test_problems, 1),
        candidates=(candidates, 1),
        max_len=(max_len, 8),
    )
    seed = check_seed(seed)  # before the tokenizer loads (seconds)
    from bilevel.models.hf import load_tokenizer

    tokens = _Tokens(load_tokenizer(tokenizer), max_len, max_steps=6)
    gen = torch.Generator().manual_seed(seed)
    parts, label_error = [], {}
    for name in DOMAINS:
        rows, errors = [], []
        for pid, problem in enumerate(sample_problems(per_domain, gen, trivial=name == "trivial")):
            (solution,) = write_solutions(problem, 1, error_rate, gen, trap_rate)
            k = 2 if name == "mc2" else 16
            labels = mc_labels(problem, solution, k, error_rate, trap_rate, gen)
            if name == "optimistic":
                labels = [
                    1.0 if not right and float(torch.rand(1, generator=gen)) < 0.6 else lab
                    for lab, (*_, right) in zip(labels, solution["steps"])
                ]
            elif name == "mislabeled":
                labels = [
                    1 - lab if float(torch.rand(1, generator=gen)) < 0.4 else lab for lab in labels
                ]
            exact = exact_labels(problem, solution, error_rate, trap_rate)
            errors += [abs(a - b) for a, b in zip(labels, exact)]
            rows.append((problem, solution, labels, pid))
        columns = _columns(rows, tokens)
        columns["features"] = label_features(columns["step_labels"], columns["step_mask"])
        parts.append({k: columns[k] for k in ("x", "step_labels", "step_mask", "features")})
        label_error[name] = round(sum(errors) / len(errors), 3)

    def candidate_set(problems: int, count: int) -> Columns:
        rows = []
        for pid, problem in enumerate(sample_problems(problems, gen)):
            for solution in write_solutions(problem, count, error_rate, gen, trap_rate):
                rows.append((problem, solution, [0.0] * len(solution["steps"]), pid))
        columns = _columns(rows, tokens)
        columns["candidates"] = torch.full((problems * count,), count)
        return columns

    meta = candidate_set(meta_problems, meta_candidates)
    test = candidate_set(test_problems, candidates)
    tokens.check_fits()
    return DomainData(
        names=list(DOMAINS),
        train=domain_columns(parts),
        meta={k: meta[k] for k in ("x", "step_mask", "outcome", "problem")},
        test=test,
        evaluate=best_of_n,
        info={
            "label_error": label_error,
            "chance_right": round(float(test["outcome"].mean()), 3),
            "steps_per_problem": "3-5 (trivial: 1-2)",
        },
    )
