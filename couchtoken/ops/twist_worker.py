"""``python -m couchtoken.ops.twist_worker <twist arguments>``: ``twist``, as ``--workers`` starts it.

SIGINT is ignored before anything else is imported: a Ctrl-C in a terminal
reaches the whole process group, and the supervisor decides when its
workers stop (with SIGTERM, once it has stopped accepting).  Twisted leaves
an ignored SIGINT alone, so this holds once the reactor runs too.
"""

import runpy
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

if __name__ == "__main__":
    runpy.run_module("twisted", run_name="__main__", alter_sys=True)
