"""The background worker, as the pipeline of one request: :mod:`.protocol` (request lines,
typed requests and results; torch-free), :mod:`.jobs` (queue and cancel), :mod:`.state` (volumes,
featurizer, :mod:`.cache` of features, device copies), :mod:`.handlers` (one function per
request type) and :mod:`.server` (the Worker composing them; ``python -m MedDIFTLib.worker``).
The Slicer side talks to it through :mod:`.client` and :mod:`.events`, without torch: one client
over a transport, the worker process (:mod:`.transports`) or ``meddift serve`` (:mod:`.http_transport`).

Importing this package imports nothing heavy.
"""
