-- Shared by the ledger's scripts (prepended to each). Layout of keys, fields and slots:
-- budget/src/ledger/keys.rs.
--
-- Written for speed: on our hardware Redis charges ~2 µs per redis.call, ~0.3 µs per
-- argument or field passed either way, and ~0.6 µs per number formatted in Lua. So each hash
-- is read once and written once, only changed fields are written, numbers are handed to
-- Redis as numbers (it formats integers below 2^53 exactly), and strings are built from
-- ARGV's strings.

local function num(x) return tonumber(x) or 0 end

-- Parses a reservation record: state and four words.
local function parse(rec)
  if not rec then return nil end
  return string.match(rec, '^(%a+) (%S+) (%S+) (%S+) (%S+)$')
end

-- Clears the ring slots of `key` whose bucket ended by `now`, taking their amounts off the
-- running totals `ht`/`hm`; appends the cleared fields to `w`. `st, sm, se` are the slot the
-- caller is about to use (cleared too if it lapsed). Returns the new totals, the new `nx`
-- (earliest end still stamped, 0: none) and the caller's slot. Runs at most once per bucket
-- and scope: only when `nx` has passed.
local function sweep(key, now, ring, ht, hm, st, sm, se, w)
  local names = {}
  for i = 0, ring - 1 do
    local p = 'h:' .. i .. ':'
    names[3 * i + 1], names[3 * i + 2], names[3 * i + 3] = p .. 't', p .. 'm', p .. 'e'
  end
  local all = redis.call('HMGET', key, unpack(names))
  local nx = 0
  for i = 0, ring - 1 do
    local e = num(all[3 * i + 3])
    if e > 0 and e <= now then
      ht, hm = ht - num(all[3 * i + 1]), hm - num(all[3 * i + 2])
      local n = #w
      w[n + 1], w[n + 2], w[n + 3], w[n + 4], w[n + 5], w[n + 6] = names[3 * i + 1], 0, names[3 * i + 2], 0, names[3 * i + 3], 0
      if e == se then st, sm, se = 0, 0, 0 end
    elseif e > now and (nx == 0 or e < nx) then
      nx = e
    end
  end
  return ht, hm, nx, st, sm, se
end
