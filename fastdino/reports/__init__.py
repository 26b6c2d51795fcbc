"""Pictures and summaries of runs (floor 2: reads metrics files and numbers; never imports the engine's loop)."""
