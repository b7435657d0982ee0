"""Run the server as a Ray Serve application: one replica per GPU, each the whole server
with its own engine, behind Serve's HTTP proxy (``oai-audio-server serve-ray``).

Needs the optional extra: ``pip install oai-audio-server[ray]``. Only ``app`` and
``metrics_bridge`` import Ray; the CLI side (``options``, ``config``, ``command``) does
not, so ``--help`` and ``--print-config`` work without it.
"""
