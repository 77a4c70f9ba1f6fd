"""The worker protocol, defined once (torch-free): request lines in, event lines out.

JSON lines: one request per line, one event per line. A request is ``{"id": str, "type": str,
...fields}``; an event's ``result`` is the result object of its request. Both are typed here, each
with its parser and its encoder (the parser's inverse), so no side reads or writes a field by hand:

- :mod:`.requests`: one dataclass per request type; the worker reads a line with ``parse_line`` and
  ``parse_request``, clients send what ``encode_request`` makes of the dataclasses they build;
- :mod:`.results`: one dataclass per result type; the handlers build them and send what
  ``encode_result`` makes of them, clients read them back with ``parse_result``.

The stream around it (bounded line reading, the event lines written back) is :mod:`..stream`; the
events as typed values :mod:`..events`. Coordinates are LPS mm. Imports neither torch nor monai, so
a client or an HTTP front end can share it.
"""
