// express-session with connect-redis and node-redis, unchanged, against a ringkv node's RESP
// port (RINGKV_RESP_PORT): a session is stored, read, refreshed (connect-redis's touch, an
// EXPIRE), destroyed (DEL), and a short-lived one expires on its own. Exits non-zero with the
// step that failed. Run by cluster/tests/sessions.rs, which starts the node.
import assert from "node:assert/strict"
import { once } from "node:events"

import { RedisStore } from "connect-redis"
import express from "express"
import session from "express-session"
import { createClient } from "redis"

const port = Number(process.env.RINGKV_RESP_PORT)
assert.ok(port > 0, "RINGKV_RESP_PORT names the node's RESP port")

const redis = createClient({ socket: { host: "127.0.0.1", port } })
redis.on("error", (e) => console.error("redis client:", e.message))
await redis.connect()

// One app per cookie lifetime; connect-redis turns the cookie's expiry into the key's TTL.
async function app(maxAgeMs) {
  const a = express()
  a.use(
    session({
      store: new RedisStore({ client: redis, prefix: `sess${maxAgeMs}:` }),
      secret: "ringkv session test",
      resave: false,
      saveUninitialized: false,
      cookie: { maxAge: maxAgeMs },
    }),
  )
  a.post("/login", (req, res) => {
    req.session.user = req.query.user
    res.send("ok")
  })
  a.get("/me", (req, res) => res.send(req.session.user ?? "anonymous"))
  a.post("/logout", (req, res) => req.session.destroy((e) => res.send(e ? "failed" : "ok")))
  const server = a.listen(0, "127.0.0.1")
  await once(server, "listening")
  return { server, base: `http://127.0.0.1:${server.address().port}`, prefix: `sess${maxAgeMs}:` }
}

// The cookie a login set, and the session id inside it (`s:<id>.<signature>`).
function cookieOf(res) {
  const set = res.headers.get("set-cookie")
  assert.ok(set, "login sets a session cookie")
  const cookie = set.split(";")[0]
  const id = decodeURIComponent(cookie.split("=")[1]).slice(2).split(".")[0]
  return { cookie, id }
}

async function me(base, cookie) {
  return (await fetch(`${base}/me`, { headers: { cookie } })).text()
}

const long = await app(60_000)
const login = await fetch(`${long.base}/login?user=alice`, { method: "POST" })
assert.equal(await login.text(), "ok")
const { cookie, id } = cookieOf(login)
const key = `${long.prefix}${id}`

// Stored with the cookie's lifetime as its TTL.
assert.equal(await redis.exists(key), 1, "the session is stored")
const ttl = await redis.ttl(key)
assert.ok(ttl > 0 && ttl <= 60, `TTL ${ttl} within the cookie's 60 s`)
assert.equal(await me(long.base, cookie), "alice", "the session reads back")

// Refresh: lower the TTL by hand, then a request touches the session back to 60 s.
assert.equal(await redis.expire(key, 5), 1)
assert.ok((await redis.ttl(key)) <= 5)
assert.equal(await me(long.base, cookie), "alice")
const refreshed = await redis.ttl(key)
assert.ok(refreshed > 5, `touch refreshed the TTL (now ${refreshed})`)

// Destroy: the key is gone and the cookie no longer names a session.
assert.equal(await (await fetch(`${long.base}/logout`, { method: "POST", headers: { cookie } })).text(), "ok")
assert.equal(await redis.exists(key), 0, "the session was deleted")
assert.equal(await me(long.base, cookie), "anonymous")

// Expiry: a session with a 2 s cookie is gone once its TTL has passed, with no delete.
const short = await app(2_000)
const shortLogin = await fetch(`${short.base}/login?user=bob`, { method: "POST" })
const s = cookieOf(shortLogin)
const shortKey = `${short.prefix}${s.id}`
const shortTtl = await redis.pTTL(shortKey)
assert.ok(shortTtl > 0 && shortTtl <= 2_000, `PTTL ${shortTtl} within 2 s`)
// Waits for the expiry the node reported; the node's clock decides, not this process's.
await new Promise((r) => setTimeout(r, shortTtl + 250))
let after = await me(short.base, s.cookie)
for (let i = 0; i < 40 && after !== "anonymous"; i++) {
  await new Promise((r) => setTimeout(r, 250))
  after = await me(short.base, s.cookie)
}
assert.equal(after, "anonymous", "the expired session is gone")
assert.equal(await redis.exists(shortKey), 0, "EXISTS does not count an expired key")
assert.equal(await redis.get(shortKey), null)
assert.equal(await redis.ttl(shortKey), -2)

long.server.close()
short.server.close()
await redis.quit()
console.log("connect-redis sessions: stored, read, refreshed, destroyed and expired")
