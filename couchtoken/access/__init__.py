"""Who gets what: names in the path, tokens, signed links, guess throttling, document summaries.

Pure decisions with no I/O; everything above this package builds on them.
"""
