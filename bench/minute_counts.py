"""What the console's per-minute counts cost the status script:
``.venv/bin/python -m bench.minute_counts [--rounds 6] [--writes 2000]``.

Alternating rounds on a redis-server of its own (so ``INFO commandstats`` counts only
these scripts): each round
makes ``--writes`` calls that each write the records of 20 sent jobs (one ``write_many``,
one round trip, as a bulk message's records travel: fields, marker, history, event) with
the status script as shipped (A) and with its per-minute counting left out (B). Prints
each round's calls per second and the server's time per call (``INFO commandstats``,
reset each round, which client-side noise does not move), and the ratio of the medians of
the latter, A/B. Bounded by the counts given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/minute_counts.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.infra import RedisInstance
from worker import status
from worker.broker.scripts import ThreadLocalScript

# The script before the counts: no old state read for unguarded writes, no tallies.
_ORIGINAL = (
    (
        "  local old = redis.call('HGET', key, 'state')\n"
        "  if guard == '' or old ~= 'sent' then\n"
        "    local new = old\n"
        "    for j = first, last - 1, 2 do\n"
        "      if ARGV[j] == 'state' then new = ARGV[j + 1] end\n"
        "    end\n",
        "  if guard == '' or redis.call('HGET', key, 'state') ~= 'sent' then\n",
    ),
    (
        "    -- The console's per-minute counts: outcomes, each counted when the state"
        " changes.\n"
        "    if new ~= old and (new == 'sent' or new == 'retrying' or new == 'dead')"
        " then\n"
        "      tallies[new] = (tallies[new] or 0) + 1\n"
        "    end\n",
        "",
    ),
    (
        "local minute = ns .. ':minute:' .. math.floor(now / 60000)\n"
        "for kind, n in pairs(tallies) do\n"
        "  if redis.call('HINCRBY', minute, kind, n) == n then\n"
        "    redis.call('EXPIRE', minute, MINUTE_TTL)\n"
        "  end\n"
        "end\n",
        "",
    ),
)


def _without_counts(script: str) -> str:
    for counted, before in _ORIGINAL:
        assert counted in script, counted  # the shipped script changed: update this
        script = script.replace(counted, before)
    return script


def _round(
    client: redis.Redis, store: status.StatusStore, writes: int, tag: str
) -> tuple[float, float]:
    """``writes`` calls of 20 records shaped as a sent job's: fields, marker, history
    entry and ``delivery.sent`` event. Returns (calls/s, server µs per call)."""
    client.config_resetstat()
    started = time.perf_counter()
    for n in range(writes):
        packed = [
            store.pack(
                f"{tag}-{n}-{i}",
                {"state": "sent", "attempts": 1, "service": "primary"},
                accepted=["someone@example.org"],
                event={"event": "sent", "attempt": 1, "service": "primary"},
                outcome=("delivery.sent", {"service": "primary", "attempts": 1}),
            )
            for i in range(20)
        ]
        store.write_many(packed)
    rate = writes / (time.perf_counter() - started)
    stats = client.info("commandstats")
    calls = sum(v["calls"] for k, v in stats.items() if k.startswith("cmdstat_eval"))
    usec = sum(v["usec"] for k, v in stats.items() if k.startswith("cmdstat_eval"))
    return rate, usec / max(1, calls)


def main() -> None:
    """Run the alternating rounds on a redis-server of its own and print them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--writes", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailworker-minute-counts-") as tmp:
        server = RedisInstance("own", Path(tmp))
        server.start()
        try:
            _rounds(server.client(), args.rounds, args.writes)
        finally:
            server.stop()


def _rounds(client: redis.Redis, rounds: int, writes: int) -> None:
    shipped = status.StatusStore(client, namespace="mwbench", ttl=600)
    bare = status.StatusStore(client, namespace="mwbench", ttl=600)
    bare._write = ThreadLocalScript(client, _without_counts(status._WRITE))
    figures: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    for r in range(rounds):
        for name, store in (("A", shipped), ("B", bare))[:: 1 if r % 2 else -1]:
            figures[name].append(_round(client, store, writes, f"{name}{r}"))
            rate, usec = figures[name][-1]
            print(f"round {r + 1} {name}: {rate:6.0f} calls/s, {usec:7.1f} µs in Redis")
    median = {k: sorted(u for _, u in v)[len(v) // 2] for k, v in figures.items()}
    print(
        f"median server time per call: A (with counts) {median['A']:.1f} µs, "
        f"B (without) {median['B']:.1f} µs, A/B = {median['A'] / median['B']:.3f}"
    )


if __name__ == "__main__":
    main()
