"""service: adapter registry, serving runtime with hot-swap, HTTP API, scheduler, CLI."""
