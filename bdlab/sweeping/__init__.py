"""Running grids of experiments: the two-phase sweeper (models and shared artifacts first, then the cells) and its
plan, dry run and artifact jobs; sweep validation and summaries; one device per parallel job; the makespan
simulator that replays a grid's timings on N workers."""
