"""The gateway: where agents meet Flywheel, over the OpenAI and Anthropic HTTP APIs.

An agent changes only its base URL: it asks for a role (``coder``) and gets the version in service, canary
traffic split by session, prompt variants applied; every call is recorded as an ``interaction.recorded`` with
the version that served it; feedback and outcomes are posted against the response id. It is a service of the
serving feature: ``flywheel up`` serves it (``gateway.enabled``), ``flywheel gateway`` serves it alone.
See "Gateway" in the README.
"""
