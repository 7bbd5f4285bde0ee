"""The contenders mailworker is measured against, each as users would run it.

Every module reads its broker and sink from the environment (``BENCH_*``, see
``bench.common``), so the harness can start it as a separate worker process tree.
"""
