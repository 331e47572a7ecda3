-- Drops a reservation without charging anything. Idempotent. Commands: GET, SET, HMGET, HSET.
--
-- KEYS[1] the day's hash   KEYS[2] the task's hash   KEYS[3] the reservation's record
-- ARGV[1] now (ms)   ARGV[2] record lifetime (ms)   ARGV[3] slot   ARGV[4] its bucket end
-- ARGV[5..7] the slot's field names
--
-- Returns {what it found}: 'held' (now released), 'lapsed' (had lapsed: nothing was held
-- any more), 'committed', 'released' (both: nothing done), 'unknown' (no record).

local state, a1, a2, a3, a4 = parse(redis.call('GET', KEYS[3]))
if not state then return {'unknown'} end
if state ~= 'held' then return {state} end
if a3 ~= ARGV[3] or a4 ~= ARGV[4] then
  return redis.error_reply('ERR ledger: the reservation record names another slot')
end
local rt, rm, fin = tonumber(a1), tonumber(a2), tonumber(a4)
for _, key in ipairs({KEYS[1], KEYS[2]}) do
  local v = redis.call('HMGET', key, 'ht', 'hm', ARGV[5], ARGV[6], ARGV[7])
  -- Only if the slot still holds this reservation's bucket (not swept, not shared).
  if num(v[5]) == fin then
    redis.call('HSET', key, 'ht', num(v[1]) - rt, 'hm', num(v[2]) - rm, ARGV[5], num(v[3]) - rt, ARGV[6], num(v[4]) - rm)
  end
end
redis.call('SET', KEYS[3], 'released ' .. a1 .. ' ' .. a2 .. ' ' .. a3 .. ' ' .. a4, 'PX', ARGV[2])
if fin > tonumber(ARGV[1]) then return {'held'} end
return {'lapsed'}
