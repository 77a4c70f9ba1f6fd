"""The background worker: JSON-lines protocol, job queue, feature cache, and its torch-free client.

Importing this package imports nothing heavy: the Slicer side uses :mod:`.client` without torch.
"""
