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
#   - C{q:ku:NAME}: the set of the users of a key with tickets waiting, and
#     C{q:kwu:NAME<LF>USER}, a sorted set of each one's, by arrival;
#   - C{q:u:NAME}: a hash, the turns of a key's users: the key's own
#     virtual time (field C{<LF>}) and each user's finish in it;
#   - C{q:w:TICKET}: a hash, what a waiting request wants (key, user,
#     model, its backends as lines of C{URL<TAB>PARALLEL}, cost, weight,
#     proxy);
#   - C{q:waiters}: a sorted set of every waiting ticket, by its expiry;
#   - C{q:kinds}: a hash, how many wait for each kind of slot (a model and
#     its backends), so that a pass stops once every kind is found busy;
#   - C{q:slots:URL<LF>MODEL}: a sorted set of the tickets running MODEL
#     at the backend URL, by their lease's expiry;
#   - C{q:low:URL<LF>MODEL}: a hash, each proxy's lowered effective
#     parallel of MODEL at URL, as C{LIMIT<SPACE>EXPIRY}: the lowest
#     unexpired one is the slots' limit;
#   - C{q:slotsets}: the set of those sets, for the sweep;
#   - C{q:granted}: a hash, each running ticket's C{URL<LF>MODEL};
#   - C{q:pace}: a hash, for each model, C{LAST<SPACE>PACE<SPACE>STRETCH}:
#     when a slot of it was last freed while requests waited, the moving
#     average of the milliseconds between two (-1 until two), and the
#     stretch of waiting it was in (C{q:stretch} counts slots freed with
#     nobody waiting);
#   - C{q:r:TICKET}: a waiting ticket refused (displaced), for the round
#     that finds its message lost;
#   - C{q:seq}: the arrival counter.
# A user is sent as C{@NAME} (C{@} alone: a key's anonymous user), or C{''}
# for a key with no users, which has no second level.  A proxy hears of a
# grant it did not ask for on the channel C{q:grants:PROXY}, as
# C{TICKET<LF>URL}; of a refusal as C{TICKET<LF>!MS}, MS the milliseconds
# its C{Retry-After} says.
#
# Every queue script begins with ARGV: the prefix, now (ms), the lease
# (ms), this proxy's name, the queue's timeout (ms); sweeps expired
# waiters and leases; and ends by giving free slots to waiting requests
# (SERVE), publishing the grants of other proxies and answering this one's
# as a flat list {ticket, url, ...}, where a url C{!MS} is a refusal.
# The scripts name keys they compute (a backend's set from its URL), so the
# queue needs one Redis, not a cluster.
_QUEUE_LIBRARY: Final = """
local P = ARGV[1]
local now = tonumber(ARGV[2])
local lease_ms = tonumber(ARGV[3])
local expiry = now + lease_ms
local me = ARGV[4]
local timeout_ms = tonumber(ARGV[5])
local LONG = 2 * lease_ms + 3600000

local function user_line(key, user)
  return P .. 'q:kwu:' .. key .. '\\n' .. user
end

local function drop_waiter(id)
  local w = P .. 'q:w:' .. id
  local key, user, model, backends = unpack(redis.call('HMGET', w, 'key', 'user', 'model',
                                                       'backends'))
  user = user or ''
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
    local line = user_line(key, user)
    redis.call('ZREM', line, id)
    if redis.call('ZCARD', line) == 0 then redis.call('SREM', P .. 'q:ku:' .. key, user) end
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

-- A backend's limit for a model: its parallel, or the lowest effective
-- parallel a proxy has seen there and told within its lease.
local function limit_of(slot, parallel)
  local low = P .. 'q:low:' .. slot
  local seen = redis.call('HGETALL', low)
  for i = 1, #seen, 2 do
    local limit, until_ = string.match(seen[i + 1], '^(%d+) (%d+)$')
    if tonumber(until_) <= now then
      redis.call('HDEL', low, seen[i])
    elseif tonumber(limit) < parallel then
      parallel = tonumber(limit)
    end
  end
  return parallel
end

local function free_slot(model, backends)
  for url, parallel in string.gmatch(backends, '([^\\t\\n]+)\\t(%d+)\\n') do
    local slot = url .. '\\n' .. model
    if redis.call('ZCARD', P .. 'q:slots:' .. slot) < limit_of(slot, tonumber(parallel)) then
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

-- Entries {name, start, arrival} in turn order: least start, then first come.
local function by_turn(order)
  table.sort(order, function(a, b)
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[3] < b[3]
  end)
  return order
end

-- A key's users with requests waiting, in turn order: each user's start
-- is its finish or the key's own virtual time, if later; among equals,
-- the one whose first waiting request came first.
local function users_in_turn(key)
  local users = redis.call('SMEMBERS', P .. 'q:ku:' .. key)
  if #users == 1 then return users end
  local turns = P .. 'q:u:' .. key
  local virtual = tonumber(redis.call('HGET', turns, '\\n') or '0')
  local order = {}
  for _, user in ipairs(users) do
    local finish = tonumber(redis.call('HGET', turns, user) or '0')
    local first = redis.call('ZRANGE', user_line(key, user), 0, 0, 'WITHSCORES')
    order[#order + 1] = {user, math.max(virtual, finish), tonumber(first[2] or '0')}
  end
  local names = {}
  for i, entry in ipairs(by_turn(order)) do names[i] = entry[1] end
  return names
end

-- The waiting key whose turn is first (least start, then first come), and
-- its first request with a free slot: of its user whose turn is first,
-- by arrival, then of the next user; kinds (a model and its backends)
-- found with none are skipped, as giving slots frees none, and once every
-- kind waiting is found so, nothing more is looked at.
local function next_grant(full, virtual)
  local kinds = redis.call('HLEN', P .. 'q:kinds')
  local keys = redis.call('ZRANGE', P .. 'q:keys', 0, -1, 'WITHSCORES')
  local order = {}
  for i = 1, #keys, 2 do
    local finish = tonumber(redis.call('HGET', P .. 'q:finish', keys[i]) or '0')
    order[#order + 1] = {keys[i], math.max(virtual, finish), tonumber(keys[i + 1])}
  end
  for _, entry in ipairs(by_turn(order)) do
    for _, user in ipairs(users_in_turn(entry[1])) do
      for _, id in ipairs(redis.call('ZRANGE', user_line(entry[1], user), 0, -1)) do
        local w = redis.call('HMGET', P .. 'q:w:' .. id, 'model', 'backends', 'cost', 'weight',
                             'proxy', 'user')
        -- A ticket left in a user's line with no request (taken out by a
        -- proxy of the version before users) is dropped.
        local kind = w[1] and w[1] .. '\\n' .. w[2]
        if not kind then
          redis.call('ZREM', user_line(entry[1], user), id)
        elseif not full[kind] then
          local url, slot = free_slot(w[1], w[2])
          if url then return id, url, slot, entry, w end
          full[kind] = true
          full.n = full.n + 1
          if full.n >= kinds then return nil end
        end
      end
    end
  end
  return nil
end

-- A slot given to a request of a user behind KEY: the key's own virtual
-- time is the user's start, and the user's finish moves on by the cost.
local function serve_user(key, user, cost)
  local turns = P .. 'q:u:' .. key
  local virtual = tonumber(redis.call('HGET', turns, '\\n') or '0')
  local start = math.max(virtual, tonumber(redis.call('HGET', turns, user) or '0'))
  redis.call('HSET', turns, '\\n', tostring(start), user, tostring(start + cost))
  if redis.call('HLEN', turns) > 4096 then
    local finish = redis.call('HGETALL', turns)
    for i = 1, #finish, 2 do
      if finish[i] ~= '\\n' and tonumber(finish[i + 1]) <= start then
        redis.call('HDEL', turns, finish[i])
      end
    end
  end
  redis.call('PEXPIRE', turns, LONG)
end

-- Tell the proxy of a waiting ticket what it got: mine, or a message.
local function tell(mine, proxy, id, what)
  if proxy == me then
    mine[#mine + 1] = id
    mine[#mine + 1] = what
  else
    redis.call('PUBLISH', P .. 'q:grants:' .. proxy, id .. '\\n' .. what)
  end
end

local function serve(mine)
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
    if w[6] and w[6] ~= '' then serve_user(entry[1], w[6], tonumber(w[3])) end
    tell(mine, w[5], id, url)
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
                         'q:slotsets', 'q:granted', 'q:seq', 'q:pace', 'q:stretch'}) do
    redis.call('PEXPIRE', P .. name, LONG)
  end
  return mine
end
"""

# ARGV (after the five of every queue script): the ticket, the key, its
# user, the model, its backends (lines of URL<TAB>PARALLEL, the best
# first), its cost, the key's weight, this proxy's lowered effective
# parallels of the model (lines of URL<TAB>LIMIT), --max-queue.  The
# request waits, and whatever is free is given: to it, if its turn is
# first.  When --max-queue requests wait (on every proxy), it takes the
# place of the newest request of the key holding the most places, if its
# key would hold fewer with it, else of its own key's user holding the
# most, if its user would hold fewer (the in-process rule,
# L{ollamaproxy.backends.queue}); that request is refused.  Else it is
# refused itself.  A refusal's Retry-After is the requests waiting for its
# kind of slot and itself times its model's pace, between 1 s and the
# timeout; the timeout before any pace is measured.
ACQUIRE: Final = _QUEUE_LIBRARY + """
local function newest(set)
  local last = redis.call('ZRANGE', set, -1, -1, 'WITHSCORES')
  return last[1], tonumber(last[2])
end

-- Of the names, the one whose line holds the most requests (among equals,
-- the one whose newest came last), and how many.
local function busiest(names, line)
  local most, chosen, latest = 0, nil, -1
  for _, name in ipairs(names) do
    local n = redis.call('ZCARD', line(name))
    local _, last = newest(line(name))
    if n > most or (n == most and n > 0 and last > latest) then
      most, chosen, latest = n, name, last
    end
  end
  return chosen, most
end

local function displaced(key, user)
  local function key_line(k) return P .. 'q:kw:' .. k end
  local holder, most = busiest(redis.call('ZRANGE', P .. 'q:keys', 0, -1), key_line)
  if not holder then return nil end
  local own = redis.call('ZCARD', key_line(key))
  if own + 1 >= most then
    if user == '' or own == 0 then return nil end
    holder = key
  end
  local function line(u) return user_line(holder, u) end
  local busy, umost = busiest(redis.call('SMEMBERS', P .. 'q:ku:' .. holder), line)
  if holder == key and redis.call('ZCARD', line(user)) + 1 >= umost then return nil end
  return (newest(line(busy)))
end

local function retry_after(model, backends)
  local timed = redis.call('HGET', P .. 'q:pace', model)
  local pace = timed and tonumber(string.match(timed, '^%S+ (%S+)')) or -1
  if pace < 0 then return timeout_ms end
  local ahead = tonumber(redis.call('HGET', P .. 'q:kinds', model .. '\\n' .. backends) or '0')
  return math.floor(math.min(timeout_ms, math.max(1000, (ahead + 1) * pace)))
end

sweep()
local id, key, user, model, backends = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local lowered = {}
for url, limit in string.gmatch(ARGV[13], '([^\\t\\n]+)\\t(%d+)\\n') do lowered[url] = limit end
for url in string.gmatch(backends, '([^\\t\\n]+)\\t%d+\\n') do
  local low = P .. 'q:low:' .. url .. '\\n' .. model
  local limit = lowered[url]
  if limit then
    redis.call('HSET', low, me, limit .. ' ' .. expiry)
    redis.call('PEXPIRE', low, 2 * lease_ms)
  else
    redis.call('HDEL', low, me)
  end
end
local mine = {}
if redis.call('ZCARD', P .. 'q:waiters') >= tonumber(ARGV[14]) then
  local victim = displaced(key, user)
  -- Refused: what the sweep freed is still given out.
  if not victim then return serve({id, '!' .. retry_after(model, backends)}) end
  local v = redis.call('HMGET', P .. 'q:w:' .. victim, 'model', 'backends', 'proxy')
  drop_waiter(victim)
  local refused = '!' .. retry_after(v[1], v[2])
  redis.call('SET', P .. 'q:r:' .. victim, refused, 'PX', 2 * lease_ms)
  tell(mine, v[3], victim, refused)
end
local seq = redis.call('INCR', P .. 'q:seq')
local w = P .. 'q:w:' .. id
redis.call('HSET', w, 'key', key, 'user', user, 'model', model, 'backends', backends,
           'cost', ARGV[11], 'weight', ARGV[12], 'proxy', me)
redis.call('PEXPIRE', w, 2 * lease_ms)
redis.call('HINCRBY', P .. 'q:kinds', model .. '\\n' .. backends, 1)
redis.call('ZADD', P .. 'q:waiters', expiry, id)
local kw = P .. 'q:kw:' .. key
redis.call('ZADD', kw, seq, id)
redis.call('PEXPIRE', kw, 2 * lease_ms)
local line = user_line(key, user)
redis.call('ZADD', line, seq, id)
redis.call('PEXPIRE', line, 2 * lease_ms)
redis.call('SADD', P .. 'q:ku:' .. key, user)
redis.call('PEXPIRE', P .. 'q:ku:' .. key, 2 * lease_ms)
redis.call('ZADD', P .. 'q:keys', 'NX', seq, key)
return serve(mine)
"""

# ARGV (after the five): the ticket, its key, the charge (already divided
# by the weight), its user, the user's charge (not divided).  A waiting
# ticket leaves the queue (its client left, or it timed out); a running
# one frees its slot, and its key's finish moves by the charge (the
# true-up; for a grant that came too late, the cost given back), and its
# user's finish in the key's time alike.  A lease that expired before its
# DONE has no true-up.  A slot freed while requests wait moves its
# model's pace (the stretch, gap and average as the router's own,
# L{ollamaproxy.backends.router}).
DONE: Final = _QUEUE_LIBRARY + """
local function time_release(model)
  if redis.call('ZCARD', P .. 'q:waiters') == 0 then
    redis.call('INCR', P .. 'q:stretch')
    return
  end
  local stretch = redis.call('GET', P .. 'q:stretch') or '0'
  local timed = redis.call('HGET', P .. 'q:pace', model)
  local pace = -1
  if timed then
    local last, was_pace, was = string.match(timed, '^(%S+) (%S+) (%S+)$')
    pace = tonumber(was_pace)
    if was == stretch then
      local gap = math.min(now - tonumber(last), timeout_ms)
      pace = pace < 0 and gap or pace + 0.2 * (gap - pace)
    end
  elseif redis.call('HLEN', P .. 'q:pace') >= 1024 then
    redis.call('DEL', P .. 'q:pace')
  end
  redis.call('HSET', P .. 'q:pace', model, now .. ' ' .. pace .. ' ' .. stretch)
end

sweep()
local id, key = ARGV[6], ARGV[7]
if redis.call('ZSCORE', P .. 'q:waiters', id) then
  drop_waiter(id)
else
  local slot = redis.call('HGET', P .. 'q:granted', id)
  local charge = tonumber(ARGV[8])
  if slot then
    redis.call('ZREM', P .. 'q:slots:' .. slot, id)
    redis.call('HDEL', P .. 'q:granted', id)
    if charge ~= 0 then
      local finish = redis.call('HGET', P .. 'q:finish', key) or virtual_now()
      redis.call('HSET', P .. 'q:finish', key, tostring(tonumber(finish) + charge))
      local user, turns = ARGV[9], P .. 'q:u:' .. key
      if user ~= '' then
        local was = redis.call('HGET', turns, user) or redis.call('HGET', turns, '\\n') or '0'
        redis.call('HSET', turns, user, tostring(tonumber(was) + tonumber(ARGV[10])))
        redis.call('PEXPIRE', turns, LONG)
      end
    end
    time_release(string.match(slot, '\\n(.*)$'))
  end
end
return serve({})
"""

# ARGV (after the five): how many of this proxy's tickets wait, those
# tickets, then for each of its requests running, its ticket and its
# C{URL<LF>MODEL}.  The waiting ones' expiry moves on, the running ones'
# leases are renewed (counted again if they expired meanwhile: Redis was
# down, or restarted empty: the request still runs).  Answers {lost,
# grants}: lost, for each waiting ticket that is no longer waiting, the
# ticket and the URL it was granted, or C{!MS} if it was refused ('' if
# neither: it was forgotten), since a message may have been lost with the
# subscriber's connection.
RENEW_QUEUE: Final = _QUEUE_LIBRARY + """
sweep()
local lost = {}
local waiting = tonumber(ARGV[6])
for i = 7, 6 + waiting do
  local id = ARGV[i]
  local w = P .. 'q:w:' .. id
  if redis.call('ZSCORE', P .. 'q:waiters', id) then
    redis.call('ZADD', P .. 'q:waiters', expiry, id)
    redis.call('PEXPIRE', w, 2 * lease_ms)
    local key, user = unpack(redis.call('HMGET', w, 'key', 'user'))
    for _, name in ipairs({P .. 'q:kw:' .. key, P .. 'q:ku:' .. key,
                           user_line(key, user or '')}) do
      redis.call('PEXPIRE', name, 2 * lease_ms)
    end
  else
    local slot = redis.call('HGET', P .. 'q:granted', id)
    lost[#lost + 1] = id
    lost[#lost + 1] = slot and string.match(slot, '^([^\\n]*)')
                      or redis.call('GET', P .. 'q:r:' .. id) or ''
  end
end
for i = 7 + waiting, #ARGV, 2 do
  hold(ARGV[i], ARGV[i + 1])
end
return {lost, serve({})}
"""
