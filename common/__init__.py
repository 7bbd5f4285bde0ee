"""What producers and workers share below both.

That is the broker's names, its connection, kernel-timeout sockets and the CLI's exit
codes. It imports only ``settings`` of ours.
"""
