"""The session's local Ray Serve fixtures (``ray_session``, ``serve_http``, ``cluster_model``)
live in ``tests/conftest.py``, shared with ``tests/router``."""
