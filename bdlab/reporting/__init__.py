"""The report: results.json files -> attack x defense tables, heatmaps, trade-off curves, W&B summary."""
