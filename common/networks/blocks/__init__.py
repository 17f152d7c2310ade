"""blocks of the shared code (import the modules directly, e.g. `from common.networks.blocks.x import Y`)."""
