"""Where a contender's time goes: py-spy over its worker process tree while it drains.

``.venv/bin/python -m bench.profile --scenario mailworker`` pre-enqueues ``--n`` jobs,
starts the workers as the benchmark does, waits for ``--skip`` messages (start-up), then
records ``--seconds`` of py-spy samples of every thread of every worker process
(``--gil``: only threads holding the GIL, i.e. Python CPU), stops everything, and prints
the hottest leaf frames and the functions that include the most samples. The raw
collapsed stacks go to bench/results/. py-spy slows the workers down: the msg/s printed
here is not a benchmark figure.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # `python bench/profile.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.infra import SMTP_SINK, AioSink, PostfixSink, RedisInstance, Sink, stop_tree
from bench.run import RESULTS, snapshot
from bench.scenarios import THROUGHPUT, Context, namespace, product_poll_interval


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def summarize(raw: Path, top: int = 25) -> str:
    """Leaf frames and inclusive functions of a py-spy ``--format raw`` file."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")[1:]  # the first frame names the process
        total += int(count)
        if frames:
            leaf[frames[-1]] += int(count)
        for name in {f.split(" (")[0] for f in frames}:
            inclusive[name] += int(count)
    out = [f"{total} samples", "", "leaf frames:"]
    out += [f"  {100 * v / total:5.1f} %  {k[:140]}" for k, v in leaf.most_common(top)]
    out += ["", "functions (inclusive):"]
    out += [
        f"  {100 * v / total:5.1f} %  {k[:140]}"
        for k, v in inclusive.most_common(2 * top)
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__
    )
    parser.add_argument("--scenario", choices=list(THROUGHPUT), default="mailworker")
    parser.add_argument("--n", type=int, default=30000)
    parser.add_argument("--skip", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument(
        "--gil", action="store_true", help="only samples holding the GIL"
    )
    parser.add_argument("--processes", "-p", type=int, default=2)
    parser.add_argument("--threads", "-t", type=int, default=8)
    parser.add_argument(
        "--product", metavar="REV", help="the product at git commit REV"
    )
    args = parser.parse_args(argv)
    contender = THROUGHPUT[args.scenario]
    workdir = Path(tempfile.mkdtemp(prefix="mailworker-profile-"))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / time.strftime(f"profile-{args.scenario}-%Y%m%d-%H%M%S.txt")
    signal_timeout = 120 + args.n / 50 + args.seconds
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        pythonpath, _ = snapshot(workdir, args.product)
        server = RedisInstance("auto", workdir)
        stack.callback(server.stop)
        server.start()
        sink: Sink = (
            PostfixSink(workdir) if Path(SMTP_SINK).exists() else AioSink(workdir)
        )
        stack.callback(sink.stop)
        sink.start()
        poll_ms, poll_flag = product_poll_interval()
        ctx = Context(
            server, sink, None, args.processes, args.threads, workdir, pythonpath,
            poll_ms=poll_ms, poll_flag=poll_flag,
        )  # fmt: skip
        ns = namespace(f"profile-{args.scenario}")
        stack.callback(contender.cleanup, ctx, ns)
        contender.prepare(ctx, ns, args.n, sink)
        base = sink.arrivals.count
        log = stack.enter_context((workdir / "workers.log").open("wb"))
        procs = contender.start(ctx, ns, sink, log)
        for proc in procs:
            stack.callback(stop_tree, proc)
        if not sink.arrivals.wait_for(base + args.skip, signal_timeout):
            raise SystemExit(f"fewer than {args.skip} messages arrived")
        before = sink.arrivals.count
        command = [
            _py_spy(), "record", "--pid", str(procs[0].pid), "--subprocesses",
            "--rate", "200", "--format", "raw", "--nonblocking",
            "--duration", str(int(args.seconds)), "--output", str(out),
            *(["--gil"] if args.gil else []),
        ]  # fmt: skip
        spy = subprocess.run(command, capture_output=True, timeout=args.seconds + 60)
        delivered = sink.arrivals.count - before
        if spy.returncode != 0 or not out.exists():
            raise SystemExit(
                f"py-spy failed: {spy.stderr.decode(errors='replace')[-500:]}"
            )
    rate = delivered / args.seconds
    print(
        f"{args.scenario}: {delivered} messages accepted while py-spy recorded "
        f"(~{rate:,.0f} msg/s, slowed by py-spy); raw stacks: {out}"
    )
    print(summarize(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
