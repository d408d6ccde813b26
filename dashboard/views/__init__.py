"""One module per dashboard page; each has show(runs, place)."""
