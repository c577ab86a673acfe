"""The Lua scripts of the Redis limiter (redis.py): one EVALSHA per admit and per settle.

Both read the server's clock (TIME), so that hosts with skewed clocks agree on the windows.
"""

# KEYS: rpm hash, tpm hash, budget of the previous, current and next period
# ARGV: rpm, tpm, tokens, budget (nano), cost (nano) -- a limit < 0 is off;
#       ends of the three periods; EXPIREAT for the three budget keys; carry (nano) onto KEYS[4];
#       floor (nano): KEYS[4] starts from it if it is gone (Redis lost it; this host saw it spent)
# -> {1, second, period index, spent} or {0, limit index, wait ms, used, asked, period index}
ADMIT = """
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec + tonumber(t[2]) / 1000000
local W = 60

local function window(key, lim, need)
  local h = redis.call('HGETALL', key)
  local total, live, dead = 0, {}, {}
  for i = 1, #h, 2 do
    local b = tonumber(h[i])
    if b <= sec - W then dead[#dead + 1] = h[i]
    else total = total + tonumber(h[i + 1]); live[#live + 1] = {b, tonumber(h[i + 1])} end
  end
  if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
  if need > lim and lim >= 1 then need = lim end
  if total + need <= lim then return total, 0 end
  table.sort(live, function(x, y) return x[1] < y[1] end)
  local left = total
  for _, e in ipairs(live) do
    left = left - e[2]
    if left + need <= lim then return total, e[1] + W - now end
  end
  return total, W
end

local rpm, tpm, need = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local budget, cost = tonumber(ARGV[4]), tonumber(ARGV[5])
local ends = {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])}
local pi = 2
if now < ends[1] then pi = 1 elseif now >= ends[2] then pi = 3 end
local bkey = KEYS[2 + pi]
if ARGV[13] ~= '0' and redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('SET', KEYS[4], ARGV[13])
  redis.call('EXPIREAT', KEYS[4], ARGV[10])
end
if ARGV[12] ~= '0' then
  if redis.call('INCRBY', KEYS[4], ARGV[12]) < 0 then redis.call('SET', KEYS[4], '0') end
  redis.call('EXPIREAT', KEYS[4], ARGV[10])
end

local worst, which, used, asked = 0, 0, 0, 0
if rpm >= 0 then
  local u, w = window(KEYS[1], rpm, 1)
  if w > worst then worst, which, used, asked = w, 1, u, 1 end
end
if tpm >= 0 then
  local u, w = window(KEYS[2], tpm, need)
  if w > worst then worst, which, used, asked = w, 2, u, need end
end
local spent = 0
if budget >= 0 then
  spent = tonumber(redis.call('GET', bkey) or '0')
  if spent + cost > budget then
    local w = ends[pi] - now
    if w < 1 then w = 1 end
    if w > worst then worst, which, used, asked = w, 3, spent, cost end
  end
end
if which > 0 then return {0, which, math.ceil(worst * 1000), used, asked, pi} end

if rpm >= 0 then
  redis.call('HINCRBY', KEYS[1], t[1], 1)
  redis.call('EXPIRE', KEYS[1], W + 1)
end
if tpm >= 0 then
  redis.call('HINCRBY', KEYS[2], t[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], W + 1)
end
if budget >= 0 then
  spent = redis.call('INCRBY', bkey, ARGV[5])
  redis.call('EXPIREAT', bkey, ARGV[8 + pi])
end
return {1, sec, pi, spent}
"""

# KEYS: tpm hash, budget key of the reservation's period
# ARGV: bucket ('' if no tpm), token delta, actual tokens, nano delta ('' if no budget), actual nano,
#       period end, EXPIREAT for the budget key
SETTLE = """
local t = redis.call('TIME')
local sec = tonumber(t[1])
local W = 60
if ARGV[1] ~= '' then
  local b = tonumber(ARGV[1])
  if b > sec - W then
    if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
      if redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2]) < 0 then redis.call('HSET', KEYS[1], ARGV[1], '0') end
    else
      redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[3])    -- the reservation was lost (restart)
    end
    redis.call('EXPIRE', KEYS[1], W + 1)
  elseif tonumber(ARGV[2]) > 0 then
    redis.call('HINCRBY', KEYS[1], t[1], ARGV[2])
    redis.call('EXPIRE', KEYS[1], W + 1)
  end
end
if ARGV[4] ~= '' then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    if redis.call('INCRBY', KEYS[2], ARGV[4]) < 0 then redis.call('SET', KEYS[2], '0', 'KEEPTTL') end
  elseif sec < tonumber(ARGV[6]) then
    redis.call('INCRBY', KEYS[2], ARGV[5])
    redis.call('EXPIREAT', KEYS[2], ARGV[7])
  end
end
return 1
"""

# KEYS: budget counter of one key and period
# ARGV: nano-USD the usage store recorded for it in the period, EXPIREAT
# Raised to the store's amount, never lowered: the store's total holds what was counted here since.
SEED = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('EXPIREAT', KEYS[1], ARGV[2])
end
return 1
"""
