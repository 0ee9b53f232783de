"""The gateway: where agents meet Flywheel, over the OpenAI and Anthropic HTTP APIs.

An agent changes only its base URL: it asks for a role (``coder``) and gets the version in service, canary
traffic split by session, prompt variants applied; every call is recorded as an ``interaction.recorded`` with
the version that served it; feedback and outcomes are posted against the response id. ``flywheel up`` serves it
(``gateway.enabled``), ``flywheel gateway`` serves it alone. See ``plugins/gateway/README.md``.

The plugin registers no processor or projection: the gateway is a service. Until the ``register_services`` hook
exists, ``engine/commands/gateway.py`` and ``flywheel up`` start it through ``plugins.gateway.service``.
"""
