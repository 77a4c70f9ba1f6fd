"""Conventions every stage keeps: LPS geometry, volume and point I/O, errors, progress, devices.

Submodules are imported on their own; only :mod:`.devices` needs torch.
"""
