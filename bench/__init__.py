"""Benchmarks of what users get from the gateway, side by side in one run (``make bench``)."""
