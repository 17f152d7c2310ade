"""bundle of the shared code (import the modules directly, e.g. `from common.bundle.x import Y`)."""
