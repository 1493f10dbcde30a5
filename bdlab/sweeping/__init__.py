"""Running grids of experiments: sweep validation and summaries, one device per parallel job."""
