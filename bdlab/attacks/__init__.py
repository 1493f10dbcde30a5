"""Backdoor attacks: which samples to poison, how to stamp a batch, how to relabel, how training changes."""

from bdlab.attacks.abe import ABE
from bdlab.attacks.badnets import BadNets, BadNetsCheckerboard, BlendedPatch
from bdlab.attacks.base import Attack, NoAttack, PoisonedSet
from bdlab.attacks.blended import Blended
from bdlab.attacks.dfst import DFST
from bdlab.attacks.imc import IMC
from bdlab.attacks.latent_backdoor import LatentBackdoor
from bdlab.attacks.targeted import Targeted
from bdlab.attacks.trojannet import TrojanNet
from bdlab.attacks.trojannn import TrojanNN

__all__ = ["ABE", "DFST", "IMC", "Attack", "BadNets", "BadNetsCheckerboard", "Blended", "BlendedPatch",
           "LatentBackdoor", "NoAttack", "PoisonedSet", "Targeted", "TrojanNN", "TrojanNet"]
