"""E-mail actions (docs/design.md §11): per-recipient keys, the buttons, the replies.

- ``keys``: the keys (128 random bits each) and their records in Redis.
- ``render``: each recipient's own message: its Reply-To, buttons and lines.
"""
