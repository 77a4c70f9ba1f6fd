"""The worker protocol, defined once (torch-free): request lines in, event lines out.

JSON lines: one request per line, one event per line. A request is ``{"id": str, "type": str,
...fields}``. Requests are typed in :mod:`.requests`: one dataclass per request type; the worker
reads a line with ``parse_line`` and ``parse_request``, clients send what ``encode_request`` (the
parser's inverse) makes of the dataclasses they build, so no side writes a request's fields by hand.

The stream around it (bounded line reading, the event lines written back) is :mod:`..stream`; the
events as typed values :mod:`..events`. Coordinates are LPS mm. Imports neither torch nor monai, so
a client or an HTTP front end can share it.
"""
