"""data filtering defenses (TrojanZoo's taxonomy)."""
