"""Backdoor attacks: which samples to poison, how to stamp a batch, how to relabel."""

from bdlab.attacks.badnets import BadNets, BlendedPatch
from bdlab.attacks.base import Attack, NoAttack, PoisonedSet
from bdlab.attacks.blended import Blended

__all__ = ["Attack", "BadNets", "Blended", "BlendedPatch", "NoAttack", "PoisonedSet"]
