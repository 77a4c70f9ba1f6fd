"""The worker protocol, defined once (torch-free): request lines in, event lines out.

JSON lines: one request per line, one event per line. A request is ``{"id": str, "type": str,
...fields}``; an event's ``result`` is the result object of its request. Both are typed here, each
with its parser and its encoder (the parser's inverse), so no side reads or writes a field by hand:

- one module per job family holds its request and result dataclasses with their parsers and
  encoders: :mod:`.volume_jobs` (probe, load, unload, features), :mod:`.pair_jobs` (match,
  register, overlays), :mod:`.lesion_jobs` (track, track_series) and :mod:`.control` (cancel,
  shutdown), over the shared field readers and writers of :mod:`.codec`;
- :mod:`.requests`, the entry point for requests: the worker reads a line with ``parse_line`` and
  ``parse_request``, clients send what ``encode_request`` makes of the dataclasses they build;
- :mod:`.results`, the entry point for results: the handlers send what ``encode_result`` makes of
  their typed results, clients read them back with ``parse_result``.

Both entry points name every type of their side, so callers import from them. The stream around
it (bounded line reading, the event lines written back) is :mod:`..stream`; the events as typed
values :mod:`..events`. Coordinates are LPS mm. Imports neither torch nor monai, so a client or an
HTTP front end can share it.
"""
