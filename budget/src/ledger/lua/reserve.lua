-- Reserves budget for one model call, or refuses it. Atomic: no other ledger script runs
-- in between, so concurrent callers can never reserve the same headroom twice.
-- Commands: HMGET, HSET, HINCRBY, SET, PEXPIRE (all in the ACL's LEDGER_COMMANDS).
--
-- KEYS[1] the day's hash   KEYS[2] the task's hash   KEYS[3] the new reservation's record
-- ARGV[1] now (ms)   ARGV[2] slot   ARGV[3] when the slot's bucket ends (the reservation
-- lapses)   ARGV[4] record lifetime (ms)   ARGV[5] usage hashes' lifetime (ms)
-- ARGV[6] daily token limit   ARGV[7] daily µ$ limit   ARGV[8] task token limit
-- ARGV[9] task µ$ limit (both: the ledger's, or the caller's cap where lower)   ARGV[10] role soft tokens, -1: none   ARGV[11] role soft µ$, -1: none
-- ARGV[12] tokens   ARGV[13] unused   ARGV[14] the cost with the model asked for
-- ARGV[15] '1' if the role has a cheaper model, else ''   ARGV[16] the cost with it
-- ARGV[17] slots in the ring   ARGV[18..20] the slot's field names 'h:<s>:t', 'h:<s>:m',
-- 'h:<s>:e'   ARGV[21..23] 'r:<role>:t', 'r:<role>:m', 'r:<role>:rerouted'
--
-- Returns {1, soft_limit_exceeded, rerouted} (0 or 1 each), or {0, limit, committed, held,
-- requested, limit value} where limit is 1 day tokens, 2 day µ$, 3 task tokens, 4 task µ$.

local now, fin = tonumber(ARGV[1]), tonumber(ARGV[3])
local tokens, cost, cost_arg = tonumber(ARGV[12]), tonumber(ARGV[14]), ARGV[14]

local d = redis.call('HMGET', KEYS[1], 'ht', 'hm', 'nx', ARGV[18], ARGV[19], ARGV[20], 't', 'm', 'x', ARGV[21], ARGV[22])
local t = redis.call('HMGET', KEYS[2], 'ht', 'hm', 'nx', ARGV[18], ARGV[19], ARGV[20], 't', 'm', 'x')

-- Held amounts: running totals, after dropping what lapsed.
local dw, tw = {}, {}
local dht, dhm, dnx, dst, dsm, dse = num(d[1]), num(d[2]), num(d[3]), num(d[4]), num(d[5]), num(d[6])
local tht, thm, tnx, tst, tsm, tse = num(t[1]), num(t[2]), num(t[3]), num(t[4]), num(t[5]), num(t[6])
local dswept = dnx > 0 and dnx <= now
local tswept = tnx > 0 and tnx <= now
local ring = tonumber(ARGV[17])
if dswept then dht, dhm, dnx, dst, dsm, dse = sweep(KEYS[1], now, ring, dht, dhm, dst, dsm, dse, dw) end
if tswept then tht, thm, tnx, tst, tsm, tse = sweep(KEYS[2], now, ring, tht, thm, tst, tsm, tse, tw) end

-- The role's soft limits: its committed spend plus this call, with the model asked for.
-- Held amounts are not counted: a soft limit only moves the role to a cheaper model.
local soft_t, soft_m = tonumber(ARGV[10]), tonumber(ARGV[11])
local soft = 0
if (soft_t >= 0 and num(d[10]) + tokens > soft_t) or (soft_m >= 0 and num(d[11]) + cost > soft_m) then soft = 1 end
local rerouted = 0
if soft == 1 and ARGV[15] ~= '' then
  cost, cost_arg, rerouted = tonumber(ARGV[16]), ARGV[16], 1
end

-- Hard limits: day first (its refusal engages the kill switch), then task.
local refusal
local dt, dm, tt, tm = num(d[7]), num(d[8]), num(t[7]), num(t[8])
if dt + dht + tokens > tonumber(ARGV[6]) then
  refusal = {0, 1, dt, dht, tokens, tonumber(ARGV[6])}
elseif dm + dhm + cost > tonumber(ARGV[7]) then
  refusal = {0, 2, dm, dhm, cost, tonumber(ARGV[7])}
elseif tt + tht + tokens > tonumber(ARGV[8]) then
  refusal = {0, 3, tt, tht, tokens, tonumber(ARGV[8])}
elseif tm + thm + cost > tonumber(ARGV[9]) then
  refusal = {0, 4, tm, thm, cost, tonumber(ARGV[9])}
end
if refusal then
  -- Keep what a sweep found; count the refusal.
  if dswept then redis.call('HSET', KEYS[1], 'ht', dht, 'hm', dhm, 'nx', dnx, unpack(dw)) end
  if tswept then redis.call('HSET', KEYS[2], 'ht', tht, 'hm', thm, 'nx', tnx, unpack(tw)) end
  redis.call('HINCRBY', KEYS[1], 'refusals', 1)
  if not d[9] then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
  return refusal
end

-- Holds the amounts in the bucket's slot of one scope and writes the scope. Should the slot
-- still hold another live bucket (clocks far apart), the two share it and lapse at the later
-- end: over-counted for a while, never under-counted.
local function hold(key, ht, hm, nx, st, sm, se, w, swept, new)
  if se ~= 0 and se ~= fin and se <= now then
    -- Stamped but lapsed without a sweep: cannot happen while `nx` is kept; be safe.
    ht, hm, st, sm, se = ht - st, hm - sm, 0, 0, 0
  end
  -- After the sweep's cleared fields, which may include this slot's: later pairs win.
  local n = #w
  w[n + 1], w[n + 2], w[n + 3], w[n + 4] = 'ht', ht + tokens, 'hm', hm + cost
  n = n + 4
  if se == 0 then
    st, sm, se = tokens, cost, fin
    w[n + 1], w[n + 2] = ARGV[20], fin
    n = n + 2
  else
    st, sm = st + tokens, sm + cost
    if fin > se then
      se = fin
      w[n + 1], w[n + 2] = ARGV[20], fin
      n = n + 2
    end
  end
  if nx == 0 or se < nx then
    nx, swept = se, true
  end
  if swept then
    w[n + 1], w[n + 2] = 'nx', nx
    n = n + 2
  end
  w[n + 1], w[n + 2], w[n + 3], w[n + 4] = ARGV[18], st, ARGV[19], sm
  n = n + 4
  if new then
    w[n + 1], w[n + 2] = 'x', 1
  end
  redis.call('HSET', key, unpack(w))
  if new then redis.call('PEXPIRE', key, ARGV[5]) end
end
hold(KEYS[1], dht, dhm, dnx, dst, dsm, dse, dw, dswept, not d[9])
hold(KEYS[2], tht, thm, tnx, tst, tsm, tse, tw, tswept, not t[9])
if rerouted == 1 then redis.call('HINCRBY', KEYS[1], ARGV[23], 1) end
redis.call('SET', KEYS[3], 'held ' .. ARGV[12] .. ' ' .. cost_arg .. ' ' .. ARGV[2] .. ' ' .. ARGV[3], 'PX', ARGV[4])
return {1, soft, rerouted}
