"""Ray Train run: per-task streams, the S2Sched actor, checkpoints and resume."""
