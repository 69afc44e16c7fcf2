"""`watchdog run`: the fallback supervisor (server process tree, safer-config ladder, resuming proxy)."""
