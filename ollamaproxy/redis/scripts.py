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


# The fair queue shared by every proxy (L{ollamaproxy.redis.queue}).  Key
# names, after the prefix, all under C{q:}:
#   - C{q:virtual}: the virtual time now (the start of the last slot given);
#   - C{q:finish}: a hash, each key's virtual finish;
#   - C{q:keys}: a sorted set of the keys with requests waiting, scored by
#     when the key's first waiting request came (the order among equals);
#   - C{q:kw:NAME}: a sorted set of a key's waiting tickets, by arrival;
#   - C{q:w:TICKET}: a hash, what a waiting request wants (key, model, its
#     backends as lines of C{URL<TAB>PARALLEL}, cost, weight, proxy);
#   - C{q:waiters}: a sorted set of every waiting ticket, by its expiry;
#   - C{q:kinds}: a hash, how many wait for each kind of slot (a model and
#     its backends), so that a pass stops once every kind is found busy;
#   - C{q:slots:URL<LF>MODEL}: a sorted set of the tickets running MODEL
#     at the backend URL, by their lease's expiry;
#   - C{q:slotsets}: the set of those sets, for the sweep;
#   - C{q:granted}: a hash, each running ticket's C{URL<LF>MODEL};
#   - C{q:seq}: the arrival counter.
# A proxy hears of a grant it did not ask for on the channel
# C{q:grants:PROXY}, as C{TICKET<LF>URL}.
#
# Every queue script begins with ARGV: the prefix, now (ms), the lease
# (ms), this proxy's name; sweeps expired waiters and leases; and ends by
# giving free slots to waiting requests (SERVE), publishing the grants of
# other proxies and answering this one's as a flat list {ticket, url, ...}.
# The scripts name keys they compute (a backend's set from its URL), so the
# queue needs one Redis, not a cluster.
_QUEUE_LIBRARY: Final = """
local P = ARGV[1]
local now = tonumber(ARGV[2])
local lease_ms = tonumber(ARGV[3])
local expiry = now + lease_ms
local me = ARGV[4]

local function drop_waiter(id)
  local w = P .. 'q:w:' .. id
  local key, model, backends = unpack(redis.call('HMGET', w, 'key', 'model', 'backends'))
  if model then
    local kind = model .. '\\n' .. backends
    if redis.call('HINCRBY', P .. 'q:kinds', kind, -1) <= 0 then
      redis.call('HDEL', P .. 'q:kinds', kind)
    end
  end
  redis.call('DEL', w)
  redis.call('ZREM', P .. 'q:waiters', id)
  if key then
    local kw = P .. 'q:kw:' .. key
    redis.call('ZREM', kw, id)
    if redis.call('ZCARD', kw) == 0 then redis.call('ZREM', P .. 'q:keys', key) end
  end
end

local function sweep()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'q:waiters', '-inf', now)) do
    drop_waiter(id)
  end
  for _, set in ipairs(redis.call('SMEMBERS', P .. 'q:slotsets')) do
    local dead = redis.call('ZRANGEBYSCORE', set, '-inf', now)
    if #dead > 0 then
      redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
      redis.call('HDEL', P .. 'q:granted', unpack(dead))
    end
    if redis.call('ZCARD', set) == 0 then redis.call('SREM', P .. 'q:slotsets', set) end
  end
end

local function virtual_now()
  return tonumber(redis.call('GET', P .. 'q:virtual') or '0')
end

local function free_slot(model, backends)
  for url, parallel in string.gmatch(backends, '([^\\t\\n]+)\\t(%d+)\\n') do
    local slot = url .. '\\n' .. model
    if redis.call('ZCARD', P .. 'q:slots:' .. slot) < tonumber(parallel) then
      return url, slot
    end
  end
  return nil, nil
end

local function hold(id, slot)
  local set = P .. 'q:slots:' .. slot
  redis.call('ZADD', set, expiry, id)
  redis.call('PEXPIRE', set, 2 * lease_ms)
  redis.call('SADD', P .. 'q:slotsets', set)
  redis.call('HSET', P .. 'q:granted', id, slot)
end

-- The waiting key whose turn is first (least start, then first come), and
-- its first request, by arrival, with a free slot; kinds (a model and its
-- backends) found with none are skipped, as giving slots frees none, and
-- once every kind waiting is found so, nothing more is looked at.
local function next_grant(full, virtual)
  local kinds = redis.call('HLEN', P .. 'q:kinds')
  local keys = redis.call('ZRANGE', P .. 'q:keys', 0, -1, 'WITHSCORES')
  local order = {}
  for i = 1, #keys, 2 do
    local finish = tonumber(redis.call('HGET', P .. 'q:finish', keys[i]) or '0')
    order[#order + 1] = {keys[i], math.max(virtual, finish), tonumber(keys[i + 1])}
  end
  table.sort(order, function(a, b)
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[3] < b[3]
  end)
  for _, entry in ipairs(order) do
    for _, id in ipairs(redis.call('ZRANGE', P .. 'q:kw:' .. entry[1], 0, -1)) do
      local w = redis.call('HMGET', P .. 'q:w:' .. id, 'model', 'backends', 'cost', 'weight',
                           'proxy')
      local kind = w[1] .. '\\n' .. w[2]
      if not full[kind] then
        local url, slot = free_slot(w[1], w[2])
        if url then return id, url, slot, entry, w end
        full[kind] = true
        full.n = full.n + 1
        if full.n >= kinds then return nil end
      end
    end
  end
  return nil
end

local function serve()
  local mine = {}
  local full = {n = 0}
  local virtual = virtual_now()
  for _ = 1, redis.call('ZCARD', P .. 'q:waiters') do
    local id, url, slot, entry, w = next_grant(full, virtual)
    if not id then break end
    drop_waiter(id)
    hold(id, slot)
    virtual = entry[2]
    redis.call('SET', P .. 'q:virtual', tostring(virtual))
    redis.call('HSET', P .. 'q:finish', entry[1],
               tostring(virtual + tonumber(w[3]) / tonumber(w[4])))
    if w[5] == me then
      mine[#mine + 1] = id
      mine[#mine + 1] = url
    else
      redis.call('PUBLISH', P .. 'q:grants:' .. w[5], id .. '\\n' .. url)
    end
  end
  if redis.call('HLEN', P .. 'q:finish') > 4096 then
    -- A key whose finish has passed is as good as one never seen.
    local finish = redis.call('HGETALL', P .. 'q:finish')
    for i = 1, #finish, 2 do
      if tonumber(finish[i + 1]) <= virtual then redis.call('HDEL', P .. 'q:finish', finish[i]) end
    end
  end
  -- Nobody using the queue for a while: it is forgotten, as a key idle
  -- long enough would be (no credit, no debt).
  for _, name in ipairs({'q:virtual', 'q:finish', 'q:keys', 'q:waiters', 'q:kinds',
                         'q:slotsets', 'q:granted', 'q:seq'}) do
    redis.call('PEXPIRE', P .. name, 2 * lease_ms + 3600000)
  end
  return mine
end
"""

# ARGV (after the four of every queue script): the ticket, the key, the
# model, its backends (lines of URL<TAB>PARALLEL, the best first), its cost,
# the key's weight.  The request waits, and whatever is free is given: to
# it, if its turn is first.
ACQUIRE: Final = _QUEUE_LIBRARY + """
sweep()
local id, key = ARGV[5], ARGV[6]
local seq = redis.call('INCR', P .. 'q:seq')
local w = P .. 'q:w:' .. id
redis.call('HSET', w, 'key', key, 'model', ARGV[7], 'backends', ARGV[8], 'cost', ARGV[9],
           'weight', ARGV[10], 'proxy', me)
redis.call('PEXPIRE', w, 2 * lease_ms)
redis.call('HINCRBY', P .. 'q:kinds', ARGV[7] .. '\\n' .. ARGV[8], 1)
redis.call('ZADD', P .. 'q:waiters', expiry, id)
local kw = P .. 'q:kw:' .. key
redis.call('ZADD', kw, seq, id)
redis.call('PEXPIRE', kw, 2 * lease_ms)
redis.call('ZADD', P .. 'q:keys', 'NX', seq, key)
return serve()
"""

# ARGV (after the four): the ticket, its key, the charge (already divided by
# the weight).  A waiting ticket leaves the queue (its client left, or it
# timed out); a running one frees its slot, and its key's finish moves by
# the charge (the true-up; for a grant that came too late, the cost given
# back).  A lease that expired before its DONE has no true-up.
DONE: Final = _QUEUE_LIBRARY + """
sweep()
local id, key = ARGV[5], ARGV[6]
if redis.call('ZSCORE', P .. 'q:waiters', id) then
  drop_waiter(id)
else
  local slot = redis.call('HGET', P .. 'q:granted', id)
  local charge = tonumber(ARGV[7])
  if slot then
    redis.call('ZREM', P .. 'q:slots:' .. slot, id)
    redis.call('HDEL', P .. 'q:granted', id)
    if charge ~= 0 then
      local finish = redis.call('HGET', P .. 'q:finish', key) or virtual_now()
      redis.call('HSET', P .. 'q:finish', key, tostring(tonumber(finish) + charge))
    end
  end
end
return serve()
"""

# ARGV (after the four): how many of this proxy's tickets wait, those
# tickets, then for each of its requests running, its ticket and its
# C{URL<LF>MODEL}.  The waiting ones' expiry moves on, the running ones'
# leases are renewed (counted again if they expired meanwhile: Redis was
# down, or restarted empty: the request still runs).  Answers {lost,
# grants}: lost, for each waiting ticket that is no longer waiting, the
# ticket and the URL it was granted ('' if none: it was forgotten), since a
# grant's message may have been lost with the subscriber's connection.
RENEW_QUEUE: Final = _QUEUE_LIBRARY + """
sweep()
local lost = {}
local waiting = tonumber(ARGV[5])
for i = 6, 5 + waiting do
  local id = ARGV[i]
  local w = P .. 'q:w:' .. id
  if redis.call('ZSCORE', P .. 'q:waiters', id) then
    redis.call('ZADD', P .. 'q:waiters', expiry, id)
    redis.call('PEXPIRE', w, 2 * lease_ms)
    redis.call('PEXPIRE', P .. 'q:kw:' .. redis.call('HGET', w, 'key'), 2 * lease_ms)
  else
    local slot = redis.call('HGET', P .. 'q:granted', id)
    lost[#lost + 1] = id
    lost[#lost + 1] = slot and string.match(slot, '^([^\\n]*)') or ''
  end
end
for i = 6 + waiting, #ARGV, 2 do
  hold(ARGV[i], ARGV[i + 1])
end
return {lost, serve()}
"""
