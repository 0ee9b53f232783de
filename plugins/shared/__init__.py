"""The small library the built-in features share; no feature of its own, no entry point.

The base model and the adapter store (``models``), the chat format (``chat_format``), packing, losses
and attention over packed blocks (``packing``, ``segment_attention``), the precision probe
(``precision``), dataset files and held-out tasks (``datasets``, ``holdout``), the deployment book and
the model in service (``deployment_book``, ``service_model``), the code sandbox (``code``,
``sandbox``), training requests and rounds (``training_requests``, ``rounds``), early stopping
(``stopping``), deferred loading (``deferred``), a small HTTP server and an OpenAI-compatible client
(``http_server``, ``openai_client``).
"""
