"""input reformation defenses (TrojanZoo's taxonomy)."""
