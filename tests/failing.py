"""Components that fail while training, for tests of how runs record failures (named by ``_target_``)."""

from __future__ import annotations

import torch


class DivergingSGD(torch.optim.SGD):
    """SGD that builds like any optimizer and raises at its first step, as a diverging run would."""

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        raise RuntimeError("training diverged (tests.failing.DivergingSGD)")
