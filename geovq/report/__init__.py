"""Tables (JSON, CSV, Markdown) and figures (PNG) from a run directory's rows."""
