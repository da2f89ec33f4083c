"""``bilevel-run`` / ``python -m bilevel``: the Hydra app over ``configs/``.

Builds every component from its config group with ``_target_`` (so users plug in their own
classes and functions), validates the input before any training, runs
:class:`~bilevel.BilevelTrainer` and prints the learned weights. Bad input ends the process with
one line naming the field and exit code 2 (and leaves no empty run directory behind); a run
stopped by non-finite values exits with 3. The run's story (notes, progress records, the final
table) goes through Python's ``logging``: to the terminal and to the run directory's log file.

``resume=<run dir>`` continues that run with the config saved in its checkpoint; only harmless
overrides (logging, progress, evaluation and checkpoint cadence, device) and a larger
``trainer.steps`` are accepted.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bilevel.cli import folders, sweeps
from bilevel.cli.build import CONTEXT, interpolation_hint, make_trainer, seed_everything
from bilevel.cli.failures import (
    check_optimized_metric,
    crash_hint,
    failure_summary,
    optimized_value,
)
from bilevel.cli.preflight import config_dir, open_domain_keys, preflight, resumed_config_shown
from bilevel.cli.resume import continue_from, override_key
from bilevel.errors import (
    ConfigError,
    WriteError,
    check_device,
    check_seed,
    first_line,
    is_bool,
)
from bilevel.files import write_text_atomic
from bilevel.strategies.distributed import init_distributed, leave_process_group, record_failure
from bilevel.trainer import NonFiniteError
from bilevel.trainer.stopping import StopRequested

__all__ = ["main", "run"]

log = logging.getLogger("bilevel")


def _task_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra app (tests compose the config themselves)
        return []


def run(
    cfg: DictConfig, output_dir: str | Path | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Build and train from a composed config; returns the summary.

    ``output_dir`` defaults to Hydra's run directory. A ``resume`` run continues in the resumed
    run's directory when ``output_dir`` is that directory (the command line points Hydra there
    unless ``hydra.run.dir`` is given); another ``output_dir`` gets a branch of the run, and a
    checkpoint file kept outside any run directory continues in ``output_dir``. ``overrides``
    are the command-line overrides (default: Hydra's record of them).
    """
    overrides = _task_overrides() if overrides is None else list(overrides)
    own = [o for o in overrides if override_key(o) != "resume"]
    seed = check_seed(cfg.seed)
    device_name = check_device(cfg.device)
    if not is_bool(cfg.get("print_config", False)):
        raise ConfigError("print_config", f"must be true or false, got {cfg.print_config!r}")
    if output_dir is None:
        output_dir = HydraConfig.get().runtime.output_dir
    output_dir = Path(output_dir)
    resume = cfg.get("resume")
    run_dir, state = output_dir, None
    if resume:
        file, resumed_dir, state, cfg = continue_from(str(resume), own, cfg, config_dir())
        own = list(state.get("overrides") or own)
        seed = check_seed(cfg.seed)
        device_name = check_device(cfg.device)
        # an output folder of its own (an explicit hydra.run.dir, a sweep's job folder): the
        # run branches there from the checkpoint; the resumed run is left untouched
        branch = resumed_dir is not None and output_dir.resolve() != resumed_dir.resolve()
        run_dir = output_dir if branch or resumed_dir is None else resumed_dir
    dist, device = init_distributed(device_name)
    seed_everything(seed)
    trainer = make_trainer(cfg, dist, device, run_dir, own)
    check_optimized_metric(cfg, trainer)
    if resume:
        trainer.resume(file)
        trainer._resumed_from = str(resume)
        if branch:
            trainer.history_from = resumed_dir / "metrics.jsonl"
        if run_dir == output_dir and dist.is_main:
            _record_config(run_dir, cfg)
    if dist.is_main and cfg.get("print_config"):
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
    summary = trainer.fit()
    if dist.is_main:
        log.info(format_summary(summary, run_dir))
    return summary


def _record_config(run_dir: Path, cfg: DictConfig) -> None:
    """A resumed run in a folder of its own (a branch, or a checkpoint file kept elsewhere):
    Hydra recorded there the config the command line composed (``resume=...`` over the
    defaults); the run's config is the resumed one, so that is what ``.hydra/config.yaml``
    says."""
    try:
        record = run_dir / HydraConfig.get().output_subdir / "config.yaml"
    except (ValueError, TypeError):  # not under Hydra, or hydra.output_subdir=null
        return
    if record.is_file():
        write_text_atomic(record, OmegaConf.to_yaml(cfg))


def format_summary(summary: dict[str, Any], run_dir: Path) -> str:
    """The final console table: one row per domain, with any per-domain info columns."""
    info = {k: v for k, v in summary.get("info", {}).items() if isinstance(v, dict)}
    header = ["domain", "weight", *info]
    rows = [
        [name, f"{value:.4f}", *(str(info[k].get(name, "")) for k in info)]
        for name, value in summary["weights"].items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    learned = summary.get("learn_weights", True)
    title = "learned domain weights" if learned else "fixed domain weights (not learned)"
    if learned and summary.get("moves_weights") is False:
        title = f"domain weights (kept as set: {summary['solver']} weights examples, not domains)"
    elif learned and summary.get("outer_updates") == 0:
        title = "domain weights (no outer step ran: trainer.steps < trainer.outer_every)"
    elif learned and summary.get("parametrization") == "meta_weight_net":
        # per-example weights of mean 1 over a batch: a domain's mean is not a share (it can
        # be 4 where a domain takes everything), so the table says what its numbers are
        title = "learned per-example weights: each domain's mean in the last batch (batch mean 1)"
    what = summary["solver"] if learned else "trainer.learn_weights=false"
    out = [
        f"\n{title} ({what}, {summary['steps']} steps, {_seconds(summary['wall_time_s'])})",
        line(header),
        line(["-" * w for w in widths]),
        *(line(r) for r in rows),
    ]
    test = ", ".join(f"{k} {v:.4f}" for k, v in summary.get("test", {}).items())
    out.append(f"meta loss {summary['meta_loss']:.4f}" + (f" | test {test}" if test else ""))
    if summary.get("skipped_steps"):
        out.append(f"skipped updates (non-finite or diverged): {summary['skipped_steps']}")
    out.append(f"run directory: {run_dir}")
    return "\n".join(out)


# -- the app ------------------------------------------------------------------------------------


def _fail(message: str, code: int) -> None:
    """Print ``message`` (on rank 0 only: every rank meets the same error) and exit. Under
    torchrun the line also goes into the rank's error file, so that torchrun's own failure
    summary shows it (and ``exitcode``) instead of "To enable traceback see ..."."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)
    record_failure(message)
    sys.exit(code)


_run_folders_before: folders.FoldersBefore | None = None
"""The folders on the way to the run directory that existed when :func:`main` started (set
there: the Hydra app takes no arguments of ours)."""


def _job_failed(message: str, code: int) -> sweeps.FailedJob:
    """End a job with one line: a single run leaves no fresh run directory behind (one that
    holds a run, e.g. stopped on non-finite values, is kept) and exits with ``code``; a sweep
    job records its failure and the sweep goes on (:mod:`bilevel.cli.sweeps`)."""
    if not sweeps.in_sweep():
        try:
            out = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:  # not under Hydra
            out = None
        if out is not None and _run_folders_before is not None:
            folders.drop_fresh_run_dir(out, _run_folders_before, log)
        _fail(message, code)
    return sweeps.record(message, code)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def app(cfg: DictConfig) -> float | sweeps.FailedJob:
    try:
        summary = run(cfg)
    except ConfigError as err:
        return _job_failed(f"bilevel: error: {err}", 2)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        reason = first_line(str(err))
        if "Missing mandatory value" in reason:
            reason = f"missing value (???): set it on the command line, e.g. {key}=..."
        reason = interpolation_hint(reason)
        return _job_failed(f"bilevel: error: {key}: {reason}", 2)
    except NonFiniteError as err:
        return _job_failed(f"bilevel: {err}", 3)
    except StopRequested as stopped:  # the trainer logged the line and saved a checkpoint
        sys.exit(stopped.exit_code)
    except WriteError as err:  # the disk, not the job: a sweep's next jobs would meet it too
        _fail(f"bilevel: error: {err}{_after_write_error()}", 1)
    except RuntimeError as err:  # out of memory: this job's sizes (a sweep goes on)
        if not out_of_memory(err):
            return _crashed(err)
        return _job_failed(f"bilevel: error: {out_of_memory_line(err, cfg)}", 1)
    except Exception as err:  # noqa: BLE001 - a bug in a component: its traceback, kept
        return _crashed(err)
    return optimized_value(summary, cfg)


def _crashed(err: BaseException) -> sweeps.FailedJob:
    """A failure from inside a component (the user's model, loss, data builder; or ours): its
    traceback on the terminal and in ``cli.log``, ``summary.json`` with ``status: failed`` and
    the message in the run folder, and one line at the end that says where the cause likely is
    when the library can tell (exit 1; a sweep goes on to its next job)."""
    hint = crash_hint(err, CONTEXT)
    log.error(f"bilevel: the run failed: {type(err).__name__}", exc_info=err)
    try:
        out = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under Hydra
        out = None
    where = ""
    if out is not None and int(os.environ.get("RANK", "0")) == 0:
        written = failure_summary(out, err, hint)
        if written is not None:
            where = f" (traceback in {out / 'cli.log'}; summary.json says status: failed)"
    message = f"bilevel: error: {type(err).__name__}: {first_line(str(err))}"
    return _job_failed(message + (f"; {hint}" if hint else "") + where, 1)


_CPU_OOM = "DefaultCPUAllocator: can't allocate memory"


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: torch's ``OutOfMemoryError`` (CUDA and other
    accelerators) or the CPU allocator's plain RuntimeError."""
    return isinstance(err, torch.OutOfMemoryError) or _CPU_OOM in str(err)


def out_of_memory_line(err: BaseException, cfg: DictConfig) -> str:
    """One line for a run that ran out of memory: torch's own first sentence (what it tried to
    allocate), then what shrinks this library's footprint, cheapest first."""
    text = first_line(str(err))
    if _CPU_OOM in text:
        text = text[text.index(_CPU_OOM) :]
    text = text.split(". ", 2)
    said = ". ".join(text[:2]).rstrip(".")
    hints = ["lower trainer.batch_size (or set trainer.meta_batch_size)"]
    if cfg.get("solver", {}).get("products", "finite_difference") == "autograd":
        hints.append("use solver.products=finite_difference (no kept double-backward graph)")
    if "gradient_checkpointing" in cfg.get("model", {}):
        hints.append("model.gradient_checkpointing=true")
    hints.append("trainer.strategy=fsdp under torchrun (shards the model)")
    return f"out of memory ({said}): {', '.join(hints)}"


def _after_write_error() -> str:
    """What to do after a file of the run could not be written: its files keep their last
    complete versions, so a run with a checkpoint can continue once the disk can be written."""
    try:
        out = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under Hydra
        return ""
    if (out / "checkpoints" / "last.pt").is_file():
        return (
            f"; the run's files keep their last complete versions: free space (or fix the "
            f"folder), then continue with resume={out}"
        )
    return "; free space (or fix the folder), then run again"


def _seconds(value: float) -> str:
    """A wall time for people: ``3.1 s``, ``0.04 s`` (a short run is not ``0.0 s``)."""
    if value >= 1:
        return f"{value:.1f} s"
    return f"{value:.2f} s" if value >= 0.01 else "< 0.01 s"


def quiet_third_parties() -> None:
    """Silence messages the user cannot act on: alembic's plugin banners (imported by the
    Optuna sweeper) and transformers' ``is_gradient_checkpointing`` deprecation."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)


def main() -> None:
    """Console entry point. Under torchrun, ranks other than 0 keep Hydra's files out of the run
    directory."""
    quiet_third_parties()
    sweeps.codes.clear()
    # -m anywhere: Hydra's parser takes it only before the overrides ("unrecognized arguments")
    flags = [a for a in sys.argv[1:] if a in folders.MULTIRUN_FLAGS]
    sys.argv[1:] = flags + [a for a in sys.argv[1:] if a not in folders.MULTIRUN_FLAGS]
    sys.argv[1:] = open_domain_keys(folders.expand_paths(sys.argv[1:]))
    args = sys.argv[1:]
    try:
        shown = resumed_config_shown(args)
    except ConfigError as err:
        _fail(f"bilevel: error: {err}", 2)
    if shown is not None:
        print(shown, end="")
        return
    problem, composed = preflight(args)
    if problem is not None:
        _fail(f"bilevel: error: {problem}", 2)
    try:
        folders.check_explicit(args)
        sys.argv += folders.resume_overrides(args)
    except ConfigError as err:
        _fail(f"bilevel: error: {err}", 2)
    run_dir = folders.last_value(sys.argv[1:], "hydra.run.dir")
    global _run_folders_before
    _run_folders_before = folders.FoldersBefore(run_dir or folders.DEFAULT_RUN_DIR)
    sweep_before = folders.FoldersBefore(
        folders.last_value(args, "hydra.sweep.dir") or folders.DEFAULT_SWEEP_DIR
    )
    sys.argv += folders.default_folder(sys.argv[1:], composed)
    sweep_dir = folders.last_value(sys.argv[1:], "hydra.sweep.dir")
    scratch = None
    if int(os.environ.get("RANK", "0")) > 0:
        # Hydra's own folder for a rank that writes nothing (rank 0 owns the run directory):
        # a temporary one, removed when the rank ends
        scratch = tempfile.mkdtemp(prefix=f"bilevel-rank{os.environ['RANK']}-")
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    try:
        sweeps.run_app(app, args)
    finally:
        if sweep_dir is not None:  # a sweep that stopped before its first job
            folders.take_back_sweep(Path(sweep_dir), sweep_before)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    leave_process_group()
    sweeps.exit_if_failed()


if __name__ == "__main__":
    main()
