"""The watchdog's exceptions, all in one place.

    WatchdogError            base; its message is one line a user can act on
    ├── InputError           a file or directory given to the watchdog is missing, foreign or damaged
    ├── ConfigError          a setting is unknown or out of range
    ├── UsageError           a command-line argument is wrong (the CLI exits 2, like click's own)
    └── DemoError            the demo deployment could not start or run

Ledger files raise ``collectors.reader.LedgerError`` (the collectors package imports nothing
from here) and evidence sources raise ``watchdog.evidence.EvidenceError``, which the snapshot
turns into "missing: ..." lines. The CLI prints any of these as one line, never a traceback.
"""


class WatchdogError(Exception):
    pass


class InputError(WatchdogError):
    pass


class ConfigError(WatchdogError):
    pass


class UsageError(WatchdogError):
    pass


class DemoError(WatchdogError):
    pass
