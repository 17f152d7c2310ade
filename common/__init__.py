"""Shared networks, losses, metrics and data code for the multimodal MONAI bundles."""
