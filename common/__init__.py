"""What producers and workers share below both: the broker's names, its connection,
kernel-timeout sockets and the CLI's exit codes. Imports only ``settings`` of ours.
"""
