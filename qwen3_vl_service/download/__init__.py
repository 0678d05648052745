"""The model download: the Hub (hub.py), the manifest of a downloaded copy and its offline verification."""
