"""Pictures of runs and evaluations (matplotlib, Agg backend): floor 2, reads tensors and files, never the loop."""
