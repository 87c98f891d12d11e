"""Reading what training left behind: checkpoints, logged metrics, and the comparison of runs."""
