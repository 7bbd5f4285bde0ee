"""E-mail actions (docs/design.md §11): per-recipient keys, the buttons, the replies.

- ``keys``: the keys (128 random bits each), their records in Redis, their outcomes.
- ``render``: each recipient's own message: its Reply-To, buttons and lines.
- ``reply``: a reply read purely: keys, senders, action word, new text.
- ``authresults``: whether ``Authentication-Results`` prove the sender.
- ``verdict``: the rules, in order: accepted, or refused with a reason.
- ``acceptance``: ``Acceptance``: the one script that writes an answer (reply or link).
- ``replies``: ``ActionReplies``: decide and record a reply, its key and event at once.
- ``confirm``: ``Confirmations``: ``confirm_by_email``'s short reply, enqueued as a job.
- ``web``: the action links' pages (``create_links_app``, mounted by the API at ``/a``).
"""
