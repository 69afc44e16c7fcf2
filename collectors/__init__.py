"""Per-rank ledgers: the recorder that runs inside vLLM processes and the reader the sidecar uses.

Stdlib only, no torch: this package is imported inside every TP worker. The package itself imports
nothing: ``collectors.format`` (the format and the records, no I/O) is the root of the import graph,
and what does I/O (``collectors.recorder``, ``collectors.reader``) is imported only where it is used.
"""
