"""Pictures people would rather look at than read: image grids, run curves, phase bars (matplotlib, Agg)."""
