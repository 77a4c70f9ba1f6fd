"""``meddift serve``: the worker over HTTP, for a GPU machine serving Slicer on a laptop.

The same requests and events as the local worker (:mod:`..protocol`), one worker per session;
volumes are uploaded (:mod:`.wire`), never read from a server path; what the server was started
with and imposes on each request in :mod:`.config`; access and limits in :mod:`.security`;
isolation in :mod:`.sessions`; each request's event stream in :mod:`.event_stream`; the routes in
:mod:`.app`.
"""
