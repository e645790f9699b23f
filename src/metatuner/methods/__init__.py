"""One self-contained module per method; each exposes `run(cfg) -> metrics`."""
