"""model sanitisation defenses (TrojanZoo's taxonomy)."""
