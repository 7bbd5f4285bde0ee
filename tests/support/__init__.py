"""What the tests share that is not a fixture (the fixtures stay in ``tests/conftest.py``).

- ``env``: the loopback host, the shared Redis's URL, whether CI runs us.
- ``config``: mailworker.toml files written from dicts.
- ``smtp``: the aiosmtpd handler that records and answers, and its credentials.
- ``certificates``: self-signed client certificates.
- ``fake_microsoft``: the Entra ID and Graph stand-in over HTTPS.
- ``processes``: worker process groups and private Redis servers.
- ``helpers``: polling, and enqueueing with plain Redis commands.
"""
