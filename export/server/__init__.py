"""The OpenAI-compatible image server (``python export/serve.py``): :mod:`.launch` (options, backend
choice, listening), :mod:`.app` (the routes), :mod:`.request` (request validation), :mod:`.batcher`
(dynamic batching on the one model thread), :mod:`.concept_store` (the served concept folders) and
:mod:`.metrics` (Prometheus)."""
