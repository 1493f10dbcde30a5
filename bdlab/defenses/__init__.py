"""Backdoor defenses, by TrojanZoo's four categories, each with its own evaluation protocol."""

from bdlab.defenses.base import Defense, NoDefense

__all__ = ["Defense", "NoDefense"]
