"""A count a solver keeps on the device, read once at the end of a run.

A solver that detects something worth a word (a Neumann series that diverged) must not read a
flag back to the host at every call: the training loop never syncs. It adds the flag here, and
the trainer asks the solver for its notes when the run ends (:meth:`DeviceCount.total`, one
read). The count is part of the solver's checkpointed state, so a resumed run reports it whole.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DeviceCount"]


class DeviceCount:
    """How many of ``calls`` recorded flags were set; the sum stays on the flags' device."""

    def __init__(self) -> None:
        self.count: Tensor | None = None  # on the device, since the start or the resume
        self.resumed = 0  # the count in the checkpoint resumed from
        self.calls = 0

    def add(self, flag: Tensor) -> None:
        """Count a boolean (0-d) flag, without reading it."""
        flag = flag.detach().to(torch.int64)
        self.count = flag if self.count is None else self.count + flag
        self.calls += 1

    def total(self) -> int:
        """The count so far (a host read)."""
        return self.resumed + (0 if self.count is None else int(self.count.item()))

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.total(), "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """``None`` (a checkpoint from before the count existed) starts from zero."""
        state = state or {}
        self.count, self.resumed = None, int(state.get("count", 0))
        self.calls = int(state.get("calls", 0))
