"""The Lua scripts of the run store (:mod:`imagesync.runs`): each changes a run record and what
depends on it (the done set, the stale-run check, the lock) in one atomic step.

Keys and arguments are passed by :class:`imagesync.runs.RunStore`, which documents each call.
A script that changes a running run publishes its new status (``running``, ``completed``,
``abandoned``, ``cancelled``) on the run's channel, named as its record's key
(:func:`imagesync.runs.channel`), so that ``sync --wait`` hears of it at once.
"""

# The time inside a script is Redis's own (TIME), unless a caller passes one
# (tests), so that the clocks of the hosts never decide staleness. Scripts that
# read TIME and then write need effects replication (the default from Redis 7).
NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local function now(given)
    if given and given ~= '' then return tonumber(given) end
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# The end of EXCLUDE and ADD (KEYS: run, done, results, ACTIVE, LOCK; ARGV[1] the run,
# ARGV[3] the time): with ``expected`` set, 1 if the run goes on (still open, or pulls
# unreported), else the run is complete now (its lock released) and 2.
COMPLETE_IF_DONE = """
if redis.call('SCARD', KEYS[2]) < expected or redis.call('HGET', KEYS[1], 'open') == '1' then
    redis.call('PUBLISH', KEYS[1], 'running')
    return 1
end
local finished = string.format('%.6f', now(ARGV[3]))
redis.call('HSET', KEYS[1], 'status', 'completed', 'finished', finished, 'last_progress', finished)
redis.call('ZREM', KEYS[4], ARGV[1])
if redis.call('GET', KEYS[5]) == ARGV[1] then redis.call('DEL', KEYS[5]) end
redis.call('PUBLISH', KEYS[1], 'completed')
return 2
"""

# A pull reports; returns -1 unknown run, 0 duplicate, 1 recorded,
# 2 recorded and the run is now complete (lock released), 3 late report.
# A run recorded ``open`` (more pulls may be added: ADD) is not complete before ADD closes it.
# A script whose reply was lost is run again by redis-py's retry with the same
# arguments: that re-run answers what the first run answered (the outcome JSON,
# stamped with its finishing time, tells a re-run from a second delivery).
RECORD = NOW + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[2]) == 0 then
    if redis.call('HGET', KEYS[3], ARGV[2]) ~= ARGV[3] then return 0 end
    if redis.call('HGET', KEYS[1], 'completed_by') == ARGV[2] then return 2 end
    if redis.call('HGET', KEYS[1], 'status') == 'running' then return 1 end
    return 3
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'n:' .. ARGV[4], 1)
redis.call('HINCRBY', KEYS[1], 'p:' .. string.match(ARGV[2], '^[^ ]+') .. ':' .. ARGV[4], 1)  -- per node (exporter)
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 3 end
local t = now(ARGV[5])
redis.call('HSET', KEYS[1], 'last_progress', string.format('%.6f', t))
if redis.call('SCARD', KEYS[2]) >= tonumber(redis.call('HGET', KEYS[1], 'expected'))
        and redis.call('HGET', KEYS[1], 'open') ~= '1' then
    redis.call('HSET', KEYS[1], 'status', 'completed', 'finished', string.format('%.6f', t), 'completed_by', ARGV[2])
    redis.call('ZREM', KEYS[4], ARGV[1])
    if redis.call('GET', KEYS[5]) == ARGV[1] then redis.call('DEL', KEYS[5]) end
    redis.call('PUBLISH', KEYS[1], 'completed')
    return 2
end
redis.call('ZADD', KEYS[4], t + tonumber(ARGV[6]), ARGV[1])
if redis.call('GET', KEYS[5]) == ARGV[1] then redis.call('EXPIRE', KEYS[5], ARGV[7]) end
redis.call('PUBLISH', KEYS[1], 'running')
return 1
"""

# A pull still working for a run (a retry): counts as progress, as a report
# does. Returns 1 if the run is running and was touched.
TOUCH = NOW + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local t = now(ARGV[4])
redis.call('HSET', KEYS[1], 'last_progress', string.format('%.6f', t))
redis.call('ZADD', KEYS[2], t + tonumber(ARGV[2]), ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('EXPIRE', KEYS[3], ARGV[3]) end
return 1
"""

# Mark a run abandoned; returns 1 if this call did it (a re-run of the same
# call, same token, answers 1 again). Unless forced, the run must still be
# stale at this instant: a pull that reported since it was found stale saves it.
ABANDON = NOW + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'abandoned' and redis.call('HGET', KEYS[1], 'abandon_token') == ARGV[4] then return 1 end
if status ~= 'running' then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 0
end
local t = now(ARGV[2])
if ARGV[5] ~= 'force' then
    local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
    if deadline and tonumber(deadline) > t then return 0 end
end
redis.call('HSET', KEYS[1], 'status', 'abandoned', 'finished', string.format('%.6f', t), 'reason', ARGV[3],
           'abandon_token', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
redis.call('PUBLISH', KEYS[1], 'abandoned')
return 1
"""

# An operator cancels a run (``imagesync cancel``); returns 1 if this call did
# it (a re-run of the same call, same token, answers 1 again), 0 if the run is
# no longer running, -1 if there is no such run. The run stops making progress
# at once: it leaves the stale-run check, its lock is released, and its pulls
# still queued find it cancelled and are skipped; those already running finish
# and report late. A run that holds the lock but has no record yet (it is still
# listing images) gets one here, cancelled, and stops before it sends a pull.
CANCEL = NOW + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'cancelled' and redis.call('HGET', KEYS[1], 'cancel_token') == ARGV[5] then return 1 end
local t = now(ARGV[2])
local finished = string.format('%.6f', t)
if not status then
    if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
    redis.call('HSET', KEYS[1], 'id', ARGV[1], 'status', 'cancelled', 'started', finished, 'finished', finished,
               'last_progress', finished, 'expected', 0, 'cancelled_by', ARGV[3], 'reason', ARGV[4],
               'cancel_token', ARGV[5])
    redis.call('LPUSH', KEYS[4], ARGV[1])
    redis.call('DEL', KEYS[3])
    return 1
end
if status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished', finished, 'cancelled_by', ARGV[3],
           'reason', ARGV[4], 'cancel_token', ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
redis.call('PUBLISH', KEYS[1], 'cancelled')
return 1
"""

# The run's start leaves out pulls it planned and had not sent yet (a platform
# verdict that came after the record was written): the run expects fewer, and
# its record names them as excluded. ARGV[2] is JSON, node -> image -> {kind,
# reason}. A pair excluded already is not counted again, so a re-run of the
# same call changes nothing. Returns 0 if the run is not running, 1 if it
# goes on, 2 if it is now complete (every pull it still expects reported; the
# lock released).
EXCLUDE = NOW + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local per_node = cjson.decode(redis.call('HGET', KEYS[1], 'expected_per_node') or '{}')
local excluded = cjson.decode(redis.call('HGET', KEYS[1], 'excluded') or '{}')
local fewer = 0
for node, images in pairs(cjson.decode(ARGV[2])) do
    excluded[node] = excluded[node] or {}
    for image, why in pairs(images) do
        if not excluded[node][image] then
            excluded[node][image] = why
            fewer = fewer + 1
            per_node[node] = (per_node[node] or 1) - 1
            if per_node[node] <= 0 then per_node[node] = nil end
        end
    end
end
local expected = tonumber(redis.call('HGET', KEYS[1], 'expected')) - fewer
redis.call('HSET', KEYS[1], 'expected', expected, 'expected_per_node',
           next(per_node) and cjson.encode(per_node) or '{}', 'excluded', cjson.encode(excluded))
""" + COMPLETE_IF_DONE

# The run's start adds pulls it planned after the record was written (the tags its
# registries moved, asked once the first pulls were on their way), and closes the
# run: from now on, it is complete once every pull it expects has reported. ARGV[2]
# is JSON, node -> pulls added; ARGV[4] the per-node counts for the exporter (JSON,
# or empty to keep them). Only an open run takes pulls, so a re-run of the same call
# adds nothing. Returns 0 if the run is not running, 1 if it goes on, 2 if it is now
# complete (the lock released).
ADD = NOW + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'open') == '1' then
    local per_node = cjson.decode(redis.call('HGET', KEYS[1], 'expected_per_node') or '{}')
    local added = 0
    for node, count in pairs(cjson.decode(ARGV[2])) do
        per_node[node] = (per_node[node] or 0) + count
        added = added + count
    end
    local expected = tonumber(redis.call('HGET', KEYS[1], 'expected')) + added
    redis.call('HSET', KEYS[1], 'expected', expected, 'expected_per_node',
               next(per_node) and cjson.encode(per_node) or '{}')
    if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'nodes', ARGV[4]) end
    redis.call('HDEL', KEYS[1], 'open')
end
local expected = tonumber(redis.call('HGET', KEYS[1], 'expected'))
""" + COMPLETE_IF_DONE
