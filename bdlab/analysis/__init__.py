"""Analyses: studies run after training that are not defenses (trigger and image transformations, ...)."""

from bdlab.analysis.base import Analysis

__all__ = ["Analysis"]
