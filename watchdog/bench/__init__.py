"""``watchdog bench ...``: commands that print figures (medians, ratios, rates), never pass/fail.

They stand beside the product, like the demo: they drive it (and the demo) and are never imported
by it (``tests/test_layout.py``). ``cli.py`` is the ``watchdog bench`` command group.
"""
