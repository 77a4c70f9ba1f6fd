"""MRML scene glue for the Slicer module: takes the scene as an argument, needs no Qt and no torch.

:mod:`.nodes` (volume, transform and markups node I/O, RAS <-> LPS), :mod:`.results` (worker
match results into markups and table rows), :mod:`.views` (slice views for QA), :mod:`.jobs`
(a run as worker requests over scene nodes) and :mod:`.session` (the worker client, the job
folder and the running job).
"""
