"""The MedDIFT panel's sections: the Qt glue of one feature area each, with its own state and timers.

:mod:`.run` (Apply / Cancel, progress, status and log), :mod:`.dependencies` (installing the
worker's packages), :mod:`.weights` (the pretrained weights: folder, status, download or import),
:mod:`.backbone` (the features and their options, from the backbone catalogue), :mod:`.server`
(compute here or on ``meddift serve``), :mod:`.live` (live propagation), :mod:`.review` (the
pairs table), :mod:`.cursor` (the correspondence cursor), :mod:`.overlays` (QA overlays, fade,
flicker, warp, pair views) and :mod:`.lesions` (lesion tracking). Each section is made with the
module's widget (``panel``: its ``ui``, ``logic``, ``parameterNode``, ``showStatus`` and
``appendLog``), refreshes itself in ``update()``, forgets the scene in ``reset()`` (Close Scene)
and stops its timers in ``cleanup()``. The logic without Qt is in ``MedDIFTLib.slicer``.
"""
