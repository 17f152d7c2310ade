"""metrics of the shared code (import the modules directly, e.g. `from common.metrics.x import Y`)."""
