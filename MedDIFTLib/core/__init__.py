"""Conventions every stage keeps: LPS geometry, volume and point I/O, errors, progress, devices, and the
one runner of child processes (:mod:`.child`).

Submodules are imported on their own; only :mod:`.devices` needs torch.
"""
