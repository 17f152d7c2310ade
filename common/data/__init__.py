"""data of the shared code (import the modules directly, e.g. `from common.data.x import Y`)."""
