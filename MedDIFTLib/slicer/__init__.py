"""MRML scene glue for the Slicer module: takes the scene as an argument, needs no Qt and no torch.

:mod:`.nodes` (volume, transform and markups node I/O, RAS <-> LPS), :mod:`.results` (worker
match results into markups and table rows), :mod:`.views` (slice views for QA), :mod:`.scene_run`
(a run as worker requests over scene nodes), :mod:`.session` (the worker client, its
files and the run in progress), :mod:`.cursor`, :mod:`.live`, :mod:`.qa`, :mod:`.overlays`,
:mod:`.lesion_nodes` / :mod:`.track_run` (the panel's feature areas), :mod:`.background` (commands in
child processes polled from a timer), :mod:`.weights_transfer` and :mod:`.installs` (weights and
packages fetched in the background).
"""
