"""Ignite handlers and inferers used by the bundles where MONAI's own do not fit."""
