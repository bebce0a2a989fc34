# -*- test-case-name: tests.integration.test_redis_limits -*-
"""
The Lua scripts that keep the shared counts.  Redis runs each one whole
before any other command, so proxies racing for a key's last request cannot
both get it.

Times are milliseconds since the epoch from the clock of the proxy that
calls (see L{ollamaproxy.redis.limits} for why); every key the scripts
write expires, so Redis forgets what nobody uses.

Key names (the prefix, then):
  - C{rate:NAME}: a hash, the key's request bucket (C{tokens}, C{updated});
  - C{streams:NAME}: a sorted set of the key's requests in flight, lease
    ids scored by when they expire;
  - C{tokens:day:2026-12-01:NAME}, C{tokens:month:2026-12:NAME}: the
    tokens the key used in that UTC day or month;
  - C{guesses:ADDRESS}: a sorted set of the times wrong keys came from an
    address.
NAME is the key's name in the keys file; the key itself, or its digest,
never goes to Redis.
"""

from __future__ import annotations

from typing import Final

# Refusals, as ADMIT answers them.
ADMITTED: Final = 0
OVER_DAY_QUOTA: Final = 1
OVER_MONTH_QUOTA: Final = 2
TOO_MANY_STREAMS: Final = 3
OVER_RATE: Final = 4

# KEYS: rate, streams, tokens of the day, tokens of the month.
# ARGV: now, rpm, max_streams, lease id, lease ms, day quota, month quota
# (a limit of -1 is none).
# Answers {code, n}: n is the milliseconds until a token comes for
# OVER_RATE, the tokens used for the quotas.  It needs only the key, so
# that a key over a limit is refused before its body is read; RESERVE
# then reserves the request's cost.
ADMIT: Final = """
local now = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local max_streams = tonumber(ARGV[3])
local lease_ms = tonumber(ARGV[5])
local quotas = {tonumber(ARGV[6]), tonumber(ARGV[7])}
for i = 1, 2 do
  if quotas[i] >= 0 then
    local used = tonumber(redis.call('GET', KEYS[i + 2]) or '0')
    if used >= quotas[i] then return {i, used} end
  end
end
if max_streams >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_streams then return {3, 0} end
end
if rpm >= 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
  local tokens = tonumber(state[1]) or rpm
  local updated = tonumber(state[2]) or now
  tokens = math.min(rpm, tokens + math.max(0, now - updated) * rpm / 60000)
  if tokens < 1 then return {4, math.ceil((1 - tokens) * 60000 / rpm)} end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'updated', ARGV[1])
  -- A bucket left alone for a minute is full: forgetting it is the same.
  redis.call('PEXPIRE', KEYS[1], 61000)
end
if max_streams >= 0 then
  redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], 2 * lease_ms)
end
return {0, 0}
"""

# KEYS: tokens of the day, tokens of the month.
# ARGV: day quota, month quota (-1 for none), the tokens to reserve, when
# the day's and the month's counters expire.
# Answers {code, n} as ADMIT, for the quotas alone.  The check is made
# again, with the reservation: requests of a key admitted together each
# passed ADMIT's, and only as many as the quota allows may reserve.  The
# reservation is added to the counters at once, so that the next request
# sees it; RELEASE replaces it with what the request used.
RESERVE: Final = """
for i = 1, 2 do
  local quota = tonumber(ARGV[i])
  if quota >= 0 then
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    if used >= quota then return {i, used} end
  end
end
local reserve = tonumber(ARGV[3])
if reserve > 0 then
  for i = 1, 2 do
    redis.call('INCRBY', KEYS[i], reserve)
    redis.call('PEXPIREAT', KEYS[i], ARGV[i + 3])
  end
end
return {0, 0}
"""

# KEYS: streams, tokens of the day, tokens of the month.
# ARGV: lease id ('' for none), the tokens to add to the day's and to the
# month's counter (less than 0 when a request used less than it reserved),
# when they expire.
RELEASE: Final = """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
for i = 2, 3 do
  local tokens = tonumber(ARGV[i])
  if tokens ~= 0 then
    redis.call('INCRBY', KEYS[i], tokens)
    redis.call('PEXPIREAT', KEYS[i], ARGV[i + 2])
  end
end
return 0
"""

# KEYS: the streams sets of this proxy's requests in flight, one for each.
# ARGV: when the leases expire, how long the sets live, then the lease ids.
# A lease that expired meanwhile (Redis was down, or restarted empty) is
# counted again: its request is still running.
RENEW: Final = """
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[1], ARGV[i + 2])
  redis.call('PEXPIRE', key, ARGV[2])
end
return #KEYS
"""

# KEYS: token counters.  ARGV: for each, the tokens to add and when it
# expires.  Tokens used while Redis was down, added when it is back.
ADD_TOKENS: Final = """
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, ARGV[2 * i - 1])
  redis.call('PEXPIREAT', key, ARGV[2 * i])
end
return #KEYS
"""

# KEYS: guesses of an address.  ARGV: now, window ms, failures allowed,
# a member unique to this wrong key.
# Answers -1, or the milliseconds until the address may try again.
# The same count as GuessThrottle's: the last FAILURES times are kept.
GUESS: Final = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local failures = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
redis.call('ZADD', KEYS[1], now, ARGV[4])
if count + 1 > failures then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, count - failures)
end
redis.call('PEXPIRE', KEYS[1], window)
if count >= failures then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(0, math.ceil(tonumber(oldest[2]) + window - now))
end
return -1
"""
