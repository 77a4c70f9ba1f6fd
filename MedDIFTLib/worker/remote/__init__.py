"""``meddift serve``: the worker over HTTP, for a GPU machine serving Slicer on a laptop.

The same requests and events as the local worker (:mod:`..protocol`), one worker per session;
volumes are uploaded (:mod:`.wire`), never read from a server path; access, limits and
isolation in :mod:`.security` and :mod:`.sessions`; the routes in :mod:`.app`.
"""
