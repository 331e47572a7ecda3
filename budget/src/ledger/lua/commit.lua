-- Charges one model call's actual figures and frees what its reservation held. Idempotent
-- per reservation: a second commit changes nothing and returns the first one's figures. A
-- reservation that lapsed, was released, or is unknown (its record is gone) is charged all
-- the same: the spend happened. Commands: SET (with GET), HMGET, HSET, HINCRBY, PEXPIRE.
--
-- KEYS[1] the day's hash   KEYS[2] the task's hash   KEYS[3] the reservation's record
-- ARGV[1] now (ms)   ARGV[2] actual tokens   ARGV[3] actual cost (µ$)
-- ARGV[4] record lifetime (ms)   ARGV[5] usage hashes' lifetime (ms)
-- ARGV[6] reserved tokens   ARGV[7] reserved µ$ (must match the record, if any)   ARGV[8] slot   ARGV[9] the slot's bucket end (the lapse time)
-- ARGV[10..12] the slot's field names   ARGV[13..15] 'r:<role>:t', 'r:<role>:m', 'r:<role>:calls'
--
-- Returns {1 (committed) or 2 (duplicate), found, tokens, cost, over}: found is what the
-- first commit found ('held', 'lapsed', 'released', 'unknown'); over is 1 when the actual
-- figures exceeded the reservation.

local at, am = tonumber(ARGV[2]), tonumber(ARGV[3])
local rt, rm = tonumber(ARGV[6]), tonumber(ARGV[7])
local over = 0
if at > rt or am > rm then over = 1 end
-- Read the record and write the committed one in a single call; put it back if it was
-- already committed (or names another slot).
local tail = ' ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. over
local old = redis.call('SET', KEYS[3], 'committed held' .. tail, 'PX', ARGV[4], 'GET')
local state, a1, a2, a3, a4 = parse(old)
if state == 'committed' then
  redis.call('SET', KEYS[3], old, 'PX', ARGV[4])
  return {2, a1, tonumber(a2), tonumber(a3), tonumber(a4)}
end
local found = 'unknown'
if state then
  if a3 ~= ARGV[8] or a4 ~= ARGV[9] or a1 ~= ARGV[6] or a2 ~= ARGV[7] then
    redis.call('SET', KEYS[3], old, 'PX', ARGV[4])
    return redis.error_reply('ERR ledger: the reservation record does not match the reservation')
  end
  found = state
  if state == 'held' and tonumber(a4) <= tonumber(ARGV[1]) then found = 'lapsed' end
end
if found ~= 'held' then
  redis.call('SET', KEYS[3], 'committed ' .. found .. tail, 'PX', ARGV[4])
end
local fin = tonumber(ARGV[9])

local d = redis.call('HMGET', KEYS[1], 't', 'm', 'calls', 'x', ARGV[13], ARGV[14], ARGV[15], 'ht', 'hm', ARGV[10], ARGV[11], ARGV[12])
local t = redis.call('HMGET', KEYS[2], 't', 'm', 'calls', 'x', 'ht', 'hm', ARGV[10], ARGV[11], ARGV[12])
-- Frees the reservation's amounts from its slot if the slot still holds its bucket (not
-- swept, not shared); `i` is the index of 'ht' in `v`.
local function free(v, i, w)
  if state == 'held' and num(v[i + 4]) == fin then
    local n = #w
    w[n + 1], w[n + 2], w[n + 3], w[n + 4] = 'ht', num(v[i]) - rt, 'hm', num(v[i + 1]) - rm
    w[n + 5], w[n + 6], w[n + 7], w[n + 8] = ARGV[10], num(v[i + 2]) - rt, ARGV[11], num(v[i + 3]) - rm
  end
end
local dw = {ARGV[13], num(d[5]) + at, ARGV[14], num(d[6]) + am, ARGV[15], num(d[7]) + 1}
local tw = {}
free(d, 8, dw)
free(t, 5, tw)
if not d[4] then dw[#dw + 1], dw[#dw + 2] = 'x', 1 end
if not t[4] then tw[#tw + 1], tw[#tw + 2] = 'x', 1 end
redis.call('HSET', KEYS[1], 't', num(d[1]) + at, 'm', num(d[2]) + am, 'calls', num(d[3]) + 1, unpack(dw))
local calls = num(t[3]) + 1
redis.call('HSET', KEYS[2], 't', num(t[1]) + at, 'm', num(t[2]) + am, 'calls', calls, unpack(tw))
if found ~= 'held' then redis.call('HINCRBY', KEYS[1], 'late', 1) end
if over == 1 then redis.call('HINCRBY', KEYS[1], 'over', 1) end
if not d[4] then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
-- A task's counters outlive its last activity: refreshed when created and every 32 calls.
if not t[4] or calls % 32 == 0 then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
return {1, found, at, am, over}
