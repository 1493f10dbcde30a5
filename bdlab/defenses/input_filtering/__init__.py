"""input filtering defenses (TrojanZoo's taxonomy)."""
