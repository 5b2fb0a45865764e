"""What runs around the ClientApp, for the hospital's IT team: ``fedfusion hospital``.

``cli`` (the commands) -> ``launch`` (check the hospital file, start the SuperNode) with
``supernode`` (Flower's SuperNode, polling faster), ``superexec`` (Flower's SuperExec,
picking up each message sooner), ``warm`` and ``warm_stub`` (forked ClientApp starts) and
``pinned`` (ClientApps run the hospital's own installed code).
"""
