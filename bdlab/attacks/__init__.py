"""Backdoor attacks: which samples to poison, how to stamp a batch, how to relabel."""

from bdlab.attacks.badnets import BadNets, BadNetsCheckerboard, BlendedPatch
from bdlab.attacks.base import Attack, NoAttack, PoisonedSet
from bdlab.attacks.blended import Blended

__all__ = ["Attack", "BadNets", "BadNetsCheckerboard", "Blended", "BlendedPatch", "NoAttack", "PoisonedSet"]
