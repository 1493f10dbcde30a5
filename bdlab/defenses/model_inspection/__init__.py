"""model inspection defenses (TrojanZoo's taxonomy)."""
