"""Serving: the OpenAI wire format (`protocol`), metrics, and the Ray Serve application (`app`).

Part of the library so that `fastdraft serve` works from an installed package; `apps/speculative.py`
in a checkout re-exports `app.build_app` for `serve run apps.speculative:build_app`.
"""
