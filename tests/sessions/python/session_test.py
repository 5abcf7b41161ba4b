"""Flask-Session's Redis backend and redis-py, unchanged, against a ringkv node's RESP port.

The port comes from RINGKV_RESP_PORT. A Flask app stores a session, reads it, refreshes it
(Flask-Session writes it back with a new TTL on every request), destroys it, and a short-lived
session expires on its own; then redis-py's typed commands for expiry and strings get Redis's
answers. Exits non-zero at the first failed check. Run by cluster/tests/sessions.rs, which starts
the node.
"""

import os
import time
from datetime import timedelta

import redis
from flask import Flask, session
from flask_session import Session

PORT = int(os.environ["RINGKV_RESP_PORT"])


def client():
    return redis.Redis(host="127.0.0.1", port=PORT)


def app(lifetime):
    a = Flask(__name__)
    a.config.update(
        SECRET_KEY="ringkv session test",
        SESSION_TYPE="redis",
        SESSION_REDIS=client(),
        SESSION_PERMANENT=True,
        PERMANENT_SESSION_LIFETIME=lifetime,
        SESSION_KEY_PREFIX=f"flask{int(lifetime.total_seconds())}:",
    )
    Session(a)

    @a.post("/login/<user>")
    def login(user):
        session["user"] = user
        return "ok"

    @a.get("/me")
    def me():
        return session.get("user", "anonymous")

    @a.post("/logout")
    def logout():
        session.clear()
        return "ok"

    return a


def session_key(app_, test_client):
    cookie = test_client.get_cookie(app_.config["SESSION_COOKIE_NAME"])
    assert cookie is not None, "login set a session cookie"
    return app_.config["SESSION_KEY_PREFIX"] + cookie.value


def sessions():
    r = client()
    long = app(timedelta(seconds=60))
    with long.test_client() as c:
        assert c.post("/login/alice").text == "ok"
        key = session_key(long, c)
        assert r.exists(key) == 1, "the session is stored"
        ttl = r.ttl(key)
        assert 0 < ttl <= 60, f"TTL {ttl} within the session lifetime"
        assert c.get("/me").text == "alice", "the session reads back"
        # Refresh: every request writes the session back with the full lifetime.
        assert r.expire(key, 5)
        assert r.ttl(key) <= 5
        assert c.get("/me").text == "alice"
        assert r.ttl(key) > 5, "the request refreshed the TTL"
        # Destroy: Flask-Session deletes the emptied session.
        assert c.post("/logout").text == "ok"
        assert r.exists(key) == 0, "the session was deleted"
        assert c.get("/me").text == "anonymous"

    short = app(timedelta(seconds=2))
    with short.test_client() as c:
        c.post("/login/bob")
        key = session_key(short, c)
        left = r.pttl(key)
        assert 0 < left <= 2000, f"PTTL {left} within 2 s"
        # Waits for the expiry the node reported; the node's clock decides.
        time.sleep(left / 1000 + 0.25)
        for _ in range(40):
            if r.get(key) is None:
                break
            time.sleep(0.25)
        assert r.get(key) is None, "the expired session is gone"
        assert r.exists(key) == 0
        assert r.ttl(key) == -2
        # A request with the expired session's cookie finds no session.
        assert c.get("/me").text == "anonymous"


def commands():
    """redis-py's typed commands get Redis's reply shapes."""
    r = client()
    r.client_setname("ringkv-test")
    assert r.client_getname() == "ringkv-test"
    assert isinstance(r.client_id(), int)
    assert r.setex("c:a", 100, "1")
    assert 0 < r.ttl("c:a") <= 100
    assert r.psetex("c:b", 100_000, "2")
    assert r.getex("c:b", persist=True) == b"2"
    assert r.ttl("c:b") == -1
    assert r.set("c:c", "x", nx=True) is True
    assert r.set("c:c", "y", nx=True) is None
    assert r.set("c:c", "z", xx=True, get=True) == b"x"
    assert r.set("c:c", "w", keepttl=True)
    assert r.setnx("c:c", "v") is False
    assert r.getdel("c:c") == b"w"
    assert r.get("c:c") is None
    assert r.expireat("c:a", int(time.time()) + 1000)
    assert r.pexpire("c:a", 50_000, gt=True) is False
    assert r.persist("c:a") is True
    assert r.persist("c:a") is False
    assert r.mset({"c:m1": "1", "c:m2": "2"})
    assert r.mget(["c:m1", "c:m2", "c:none"]) == [b"1", b"2", None]
    assert r.incrby("c:m1", 41) == 42
    assert r.decr("c:m1") == 41
    assert r.type("c:m1") == b"string"
    assert r.type("c:none") == b"none"
    assert r.unlink("c:m1", "c:m2", "c:none") == 2
    assert isinstance(r.dbsize(), int)
    # Hashes as session objects: fields one by one, expiry on the whole hash.
    assert r.hset("c:h", mapping={"user": "alice", "cart": "3"}) == 2
    assert r.hset("c:h", "user", "bob") == 0
    assert not r.hsetnx("c:h", "user", "x")
    assert r.hget("c:h", "user") == b"bob"
    assert r.hmget("c:h", ["user", "none"]) == [b"bob", None]
    assert r.hgetall("c:h") == {b"user": b"bob", b"cart": b"3"}
    assert sorted(r.hkeys("c:h")) == [b"cart", b"user"]
    assert sorted(r.hvals("c:h")) == [b"3", b"bob"]
    assert r.hlen("c:h") == 2
    assert r.hexists("c:h", "cart")
    assert r.hincrby("c:h", "cart", 2) == 5
    assert r.hdel("c:h", "cart", "none") == 1
    assert r.type("c:h") == b"hash"
    assert r.expire("c:h", 100)
    assert 0 < r.ttl("c:h") <= 100
    assert r.hset("c:h", "more", "1") == 1
    assert r.ttl("c:h") > 0, "HSET keeps the hash's TTL"
    try:
        r.get("c:h")
        raise AssertionError("GET of a hash must fail")
    except redis.ResponseError as e:
        assert "WRONGTYPE" in str(e)
    assert r.delete("c:h") == 1
    assert r.hgetall("c:h") == {}
    assert r.ping()
    r.set("c:text", "abc")
    try:
        r.incr("c:text")
        raise AssertionError("INCR of a non-integer value must fail")
    except redis.ResponseError as e:
        assert "not an integer" in str(e)


sessions()
commands()
print("Flask-Session sessions and redis-py commands: as Redis answers them")
