"""losses of the shared code (import the modules directly, e.g. `from common.losses.x import Y`)."""
