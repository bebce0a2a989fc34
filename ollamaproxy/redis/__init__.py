"""
Limits, and the fair queue, shared by several proxies through Redis.

  - L{ollamaproxy.redis.link}: the connection, with a timeout on every call,
    whether Redis is up, and the log lines, metric and readiness that say so;
  - L{ollamaproxy.redis.scripts}: the Lua scripts that keep the counts,
    each one atomic in Redis;
  - L{ollamaproxy.redis.limits}: L{RedisLimits} and L{RedisThrottle}, which
    the app asks instead of the in-process ones, falling back to them (or
    refusing) while Redis is down;
  - L{ollamaproxy.redis.queue}: L{RedisQueue}, the fair queue and the
    backends' slots of every proxy, which the router asks instead of its
    own queue, falling back to it while Redis is down.
"""
