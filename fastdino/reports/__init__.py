"""Pictures and summaries of runs and evaluations (floor 2: reads files, arrays and numbers; never imports
the engine's loop)."""
