"""Keep the garbage collector's full passes short.

A full (generation 2) collection visits every tracked object and holds the GIL, and with
it the event loop, while it does: with PyTorch, Litestar and the tokenizer loaded that
is about 200,000 objects and ~120 ms on the 2-core test machine, and a request that
builds many objects (a long message list) sets off several in a row. Objects that live
as long as the process (modules, the model front end) are moved out of the collector's
sight once they exist, so a full pass visits only what requests created since.
"""

from __future__ import annotations

import gc


def freeze_long_lived_objects() -> None:
    """Call once start-up objects exist (after imports, after the model front end
    loads). Later garbage is collected as usual; frozen objects are never freed, which
    is what objects that live as long as the process need anyway."""
    gc.freeze()
