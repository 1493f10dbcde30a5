"""Victim training: in-memory batch loading, batched augmentation, one LightningModule."""
