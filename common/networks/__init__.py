"""networks of the shared code (import the modules directly, e.g. `from common.networks.x import Y`)."""
