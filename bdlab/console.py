"""What a bdlab command prints: its own log, Lightning's progress bar and the result table.

Other libraries' deprecation notices, Lightning's device banner and advertising tips, and W&B's
chatter are kept off the console (W&B's offline sync hint is printed by :mod:`bdlab.loggers`).
Warnings raised by bdlab itself, and every library's real warnings, still show.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet_third_party() -> None:
    """Silence the third-party console noise listed in the module docstring (call once per command)."""
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"^(?!bdlab)")
    # in-memory batches need no loader workers; Lightning's advice to add some does not apply
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # device banner ("GPU available: ..."), tips, "Trainer.fit stopped: max_epochs reached"
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric.utilities.rank_zero").setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")
