"""The status write's own connections: EVAL when the server lacks the script, and a new
connection when Redis restarted under them."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from tests.support.helpers import wait_for
from worker.broker.scripts import ThreadLocalScript, close_connections

BODY = "redis.call('INCR', ARGV[1]) return redis.call('GET', ARGV[1])"


@pytest.fixture
def client(private_redis) -> Iterator[redis.Redis]:
    """A client of the test's own Redis; its connections, direct ones too, closed after."""
    client = redis.Redis.from_url(private_redis.url)
    yield client
    close_connections(client)
    client.close()


def _ours(client: redis.Redis) -> list[dict[str, str]]:
    """The connections that last ran a script (the client's own last ran CLIENT LIST)."""
    return [c for c in client.client_list() if c["cmd"] in ("evalsha", "eval")]


@contextlib.contextmanager
def _called_from_another_thread(script: ThreadLocalScript) -> Iterator[None]:
    """Inside the block, another thread has called ``script`` and is still alive (a
    thread's connection lives as long as the thread)."""
    called, done = threading.Event(), threading.Event()

    def other_thread() -> None:
        script("n")
        called.set()
        done.wait(10)

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert called.wait(10)
        yield
    finally:
        done.set()
        thread.join()


def test_a_server_without_the_script_gets_it_with_eval(client):
    client.script_flush()
    count = ThreadLocalScript(client, BODY)
    assert count("n") == b"1"  # EVALSHA said NOSCRIPT; EVAL ran it
    assert client.script_exists(count._sha) == [True]
    assert count("n") == b"2"


def test_each_thread_has_its_own_connection_and_a_dead_one_is_replaced(
    client,
):
    count = ThreadLocalScript(client, BODY)
    assert count("n") == b"1"
    ours = [c for c in client.client_list() if c["cmd"] in ("evalsha", "eval")]
    assert len(ours) == 1
    client.client_kill_filter(_id=ours[0]["id"])
    assert count("n") == b"2"  # the killed connection is dropped, the call made anew
    assert client.get("n") == b"2"  # once


def test_errors_of_the_script_itself_are_raised_and_the_connection_kept(
    client,
):
    client.set("s", "text")
    incr = ThreadLocalScript(client, "return redis.call('INCR', ARGV[1])")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        incr("s")
    assert incr("t") == 1
    assert len([c for c in client.client_list() if c["cmd"] == "evalsha"]) == 1


def test_scripts_of_one_pool_share_each_threads_connection_and_take_keys(
    client,
):
    count = ThreadLocalScript(client, BODY)
    keyed = ThreadLocalScript(client, "return redis.call('SET', KEYS[1], ARGV[1])")
    assert keyed.run(["k"], ["v"]) == b"OK"
    assert count("n") == b"1"
    assert client.get("k") == b"v"
    assert len(_ours(client)) == 1  # one connection for both scripts in this thread
    with _called_from_another_thread(count):
        assert len(_ours(client)) == 2  # the other thread has a connection of its own
    assert client.get("n") == b"2"


def test_a_script_that_may_not_run_twice_is_not_retried_when_its_reply_is_lost(
    client,
):
    push = ThreadLocalScript(
        client, "return redis.call('RPUSH', KEYS[1], ARGV[1])", idempotent=False
    )
    assert push.run(["l"], ["a"]) == 1
    client.client_kill_filter(_id=_ours(client)[0]["id"])
    # the command goes out on the closed connection; its reply never comes
    with pytest.raises(redis.ConnectionError):
        push.run(["l"], ["b"])
    assert push.run(["l"], ["c"]) == 2  # the next call reconnects
    assert client.lrange("l", 0, -1) == [b"a", b"c"]  # "b" never ran, nothing twice


def test_an_idle_connection_the_server_closed_is_replaced_before_use(client):
    push = ThreadLocalScript(
        client, "return redis.call('RPUSH', KEYS[1], ARGV[1])", idempotent=False
    )
    assert push.run(["l"], ["a"]) == 1
    client.client_kill_filter(_id=_ours(client)[0]["id"])
    time.sleep(1.2)  # idle for longer than a second: looked at before use
    assert push.run(["l"], ["b"]) == 2
    assert client.lrange("l", 0, -1) == [b"a", b"b"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_uses_the_parents_connection(client):
    count = ThreadLocalScript(client, BODY)
    assert count("n") == b"1"
    parent = count._local.conn
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it made a connection of its own
        try:
            count("n")
            os.write(write, b"new" if count._local.conn is not parent else b"same")
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read()
    os.waitpid(pid, 0)
    assert said == b"new"
    assert count("n") == b"3"  # the parent's connection still works after the child


def test_close_connections_closes_every_threads_connection(client):
    count = ThreadLocalScript(client, BODY)
    count("n")
    with _called_from_another_thread(count):
        assert len(_ours(client)) == 2
        close_connections(client)
        wait_for(lambda: not _ours(client))
    assert count("n") == b"3"  # this thread reconnects when it calls again
