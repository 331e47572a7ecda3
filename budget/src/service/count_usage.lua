-- Counts one usage report once: sets the report's marker and, only if it was not already
-- there, adds the report to the day's counters; in one script, so no other client (another
-- delivery of the same report, taken over by a second consumer) runs in between, and a
-- report is never half counted. Commands: SET, HINCRBY, PEXPIRE, HMGET (all in the budget
-- user's grants on fleet:budget:counters:*, see fleetctl/src/acl.rs).
--
-- KEYS[1] the day's usage hash   KEYS[2] the report's marker
-- ARGV[1] the marker's lifetime (ms)   ARGV[2] the usage hash's lifetime (ms)
-- ARGV[3], ARGV[4] the role's token and µ$ fields   ARGV[5..] field, increment pairs
--
-- Returns {counted now (1) or before (0), the day's tokens, µ$, the role's tokens, µ$}.

local fresh = redis.call('SET', KEYS[2], '1', 'PX', ARGV[1], 'NX')
if fresh then
  for i = 5, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local v = redis.call('HMGET', KEYS[1], 't', 'm', ARGV[3], ARGV[4])
local counted = 0
if fresh then counted = 1 end
return {counted, tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0}
