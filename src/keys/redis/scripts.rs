//! The server-side scripts of the Redis store. Each runs atomically on the keys of one provider (all hash-tagged
//! `{prefix:provider}`, so a Cluster keeps them in one slot) and takes the caller's time as an argument.
//!
//! The rules are not here: the Rust policy decides which key serves and what an outcome does to a key; these
//! only read, check that a decision still holds, and write. What they keep per key:
//! - `state`, a hash: `s:<id>` the key's verdict (cooldowns, streaks, manual state) as JSON, `v:<id>` its
//!   version, bumped on every change of verdict;
//! - `lease:<id>` and `lease:<id>:<model>`, sorted sets of the leases in flight scored by their expiry;
//! - `day:<day start>:<id>` and `life:<id>`, hashes of counters (`<counter>:<model>`, and `requests` for the
//!   key), added to with `HINCRBY` so that they never conflict; a day's hash expires two days after its last
//!   write;
//! - `requests:<id>` and `tokens:<id>`, the key's requests and tokens over the last minute (shared windows);
//! - `pause` (the provider's pause, until) and `limited` (its keys rate-limited lately);
//! - `cursor`, a hash: the key each model stays on under sequential selection.

/// What choosing a key needs, in one round trip. KEYS: state, pause, cursor, then per key its key lease set,
/// its model lease set and its day hash. ARGV: now, model, then the ids. Returns the pause's end (0: none), the
/// model's cursor (""), then per key: verdict (""), version, leases of the key, leases of the key and model,
/// today's requests for the model, today's requests for the key.
pub const READ: &str = r#"
local now, model = tonumber(ARGV[1]), ARGV[2]
local out = {}
out[1] = tonumber(redis.call('GET', KEYS[2]) or '0')
out[2] = redis.call('HGET', KEYS[3], model) or ''
for i = 3, #ARGV do
  local lk, lm, day = KEYS[3 * i - 5], KEYS[3 * i - 4], KEYS[3 * i - 3]
  redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', lm, '-inf', now)
  out[#out + 1] = redis.call('HGET', KEYS[1], 's:' .. ARGV[i]) or ''
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[1], 'v:' .. ARGV[i]) or '0')
  out[#out + 1] = redis.call('ZCARD', lk)
  out[#out + 1] = redis.call('ZCARD', lm)
  out[#out + 1] = tonumber(redis.call('HGET', day, 'requests:' .. model) or '0')
  out[#out + 1] = tonumber(redis.call('HGET', day, 'requests') or '0')
end
return out
"#;

/// Claims a lease if the key is still eligible: the provider not paused, the key not disabled, not cooling (whole
/// key or this model), under its caps, and within its limits over the last minute (requests, tokens). A claim
/// counts the request. KEYS: state, key lease set, model lease set, request window, token window, day hash,
/// life hash, pause, cursor. ARGV: id, model, member, lease expiry, cap per key (0: none), cap per key and
/// model, now, requests per minute (0: none), tokens per minute (0: none), the day hash's time to live, 1 to
/// move the model's cursor to this key. Returns 1 when claimed, 0 when the key is not eligible, or the time a
/// window has room again.
pub const CLAIM: &str = r#"
local id, model, member, expiry = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local per_key, per_model, now = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local rpm, tpm = tonumber(ARGV[8]), tonumber(ARGV[9])
if tonumber(redis.call('GET', KEYS[8]) or '0') > now then return 0 end
local raw = redis.call('HGET', KEYS[1], 's:' .. id)
if raw then
  local s = cjson.decode(raw)
  if s.disabled then return 0 end
  if type(s.cooldown) == 'table' and s.cooldown['until'] > now then return 0 end
  local m = type(s.models) == 'table' and s.models[model]
  if type(m) == 'table' and type(m.cooldown) == 'table' and m.cooldown['until'] > now then return 0 end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if per_key > 0 and redis.call('ZCARD', KEYS[2]) >= per_key then return 0 end
if per_model > 0 and redis.call('ZCARD', KEYS[3]) >= per_model then return 0 end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - 60000)
  if redis.call('ZCARD', KEYS[4]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    return tonumber(oldest[2]) + 60000
  end
end
if tpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - 60000)
  local used = 0
  for _, entry in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
    used = used + tonumber(string.match(entry, '^(%d+)'))
  end
  if used >= tpm then
    local oldest = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
    return tonumber(oldest[2]) + 60000
  end
end
redis.call('ZADD', KEYS[2], expiry, member)
redis.call('ZADD', KEYS[3], expiry, member)
if rpm > 0 then
  redis.call('ZADD', KEYS[4], now, member)
  redis.call('PEXPIRE', KEYS[4], 61000)
end
for _, h in ipairs({KEYS[6], KEYS[7]}) do
  redis.call('HINCRBY', h, 'requests:' .. model, 1)
  redis.call('HINCRBY', h, 'requests', 1)
end
redis.call('HSET', KEYS[7], 'last_used:' .. model, now)
redis.call('PEXPIRE', KEYS[6], ARGV[10])
if ARGV[11] == '1' then redis.call('HSET', KEYS[9], model, id) end
return 1
"#;

/// Applies an outcome: frees its lease (idempotent), adds its counters, spends its tokens in the key's window,
/// writes the key's new verdict if its version is still the one the verdict was decided on, starts the
/// provider's pause when enough of its keys were rate-limited lately, and tells every instance that a key of
/// the provider may be free. KEYS: state, key lease set, model lease set, token window, day hash, life hash,
/// pause, limited. ARGV: id, member (""), channel, provider, now, model, then the counts (requests, successes,
/// failures, prompt tokens, completion tokens, cost), the day hash's time to live, 1 to forget the model's
/// counters if it never succeeded (a model the upstream refused), the expected version, the verdict (""
/// leaves it), keys that pause the provider (0: no pause), their window, the end of the rate-limit cooldown the
/// outcome started (0), 1 to return the key's counters. Returns: 1 when the verdict was written, 0 when its
/// version had moved (the caller decides again), -1 when none was given; the pause started (0); and, when
/// asked, the day's and the lifetime counters.
pub const SETTLE: &str = r#"
local id, member, now, model = ARGV[1], ARGV[2], tonumber(ARGV[5]), ARGV[6]
if member ~= '' then
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
end
local names = {'requests', 'successes', 'failures', 'prompt_tokens', 'completion_tokens', 'cost_nano_usd'}
local counted = false
for i, name in ipairs(names) do
  if ARGV[6 + i] ~= '0' then
    redis.call('HINCRBY', KEYS[5], name .. ':' .. model, ARGV[6 + i])
    redis.call('HINCRBY', KEYS[6], name .. ':' .. model, ARGV[6 + i])
    counted = true
  end
end
if ARGV[7] ~= '0' then
  redis.call('HINCRBY', KEYS[5], 'requests', ARGV[7])
  redis.call('HINCRBY', KEYS[6], 'requests', ARGV[7])
  redis.call('HSET', KEYS[6], 'last_used:' .. model, now)
end
if counted then redis.call('PEXPIRE', KEYS[5], ARGV[13]) end
if ARGV[14] == '1' and not redis.call('HGET', KEYS[6], 'successes:' .. model) then
  for _, h in ipairs({KEYS[5], KEYS[6]}) do
    for _, name in ipairs({'requests', 'failures', 'last_used'}) do redis.call('HDEL', h, name .. ':' .. model) end
  end
end
local tokens = tonumber(ARGV[10]) + tonumber(ARGV[11])
if tokens > 0 then
  redis.call('ZADD', KEYS[4], now, tokens .. ':' .. id .. ':' .. member .. ':' .. now)
  redis.call('PEXPIRE', KEYS[4], 61000)
end
local written = -1
if ARGV[16] ~= '' then
  local v = tonumber(redis.call('HGET', KEYS[1], 'v:' .. id) or '0')
  if v == tonumber(ARGV[15]) then
    redis.call('HSET', KEYS[1], 's:' .. id, ARGV[16], 'v:' .. id, v + 1)
    written = 1
  else
    written = 0
  end
end
local paused = 0
local pause_keys, window, limited = tonumber(ARGV[17]), tonumber(ARGV[18]), tonumber(ARGV[19])
if written == 1 and pause_keys > 0 and limited > 0 then
  redis.call('ZADD', KEYS[8], now, id)
  redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', now - window)
  redis.call('PEXPIRE', KEYS[8], window)
  if redis.call('ZCARD', KEYS[8]) >= pause_keys and limited > tonumber(redis.call('GET', KEYS[7]) or '0') then
    redis.call('SET', KEYS[7], limited, 'PX', math.max(1, limited - now))
    paused = limited
  end
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
if ARGV[20] == '1' then
  return {written, paused, redis.call('HGETALL', KEYS[5]), redis.call('HGETALL', KEYS[6])}
end
return {written, paused}
"#;

/// The state of keys for operators. KEYS: state, then per key its key lease set, day hash and life hash.
/// ARGV: now, then the ids. Returns per key: verdict (""), leases in flight, the day's and the lifetime
/// counters.
pub const REPORT: &str = r#"
local now = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local lk, day, life = KEYS[3 * i - 4], KEYS[3 * i - 3], KEYS[3 * i - 2]
  redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)
  out[#out + 1] = redis.call('HGET', KEYS[1], 's:' .. ARGV[i]) or ''
  out[#out + 1] = redis.call('ZCARD', lk)
  out[#out + 1] = redis.call('HGETALL', day)
  out[#out + 1] = redis.call('HGETALL', life)
end
return out
"#;

/// Writes what an instance knows of a key that Redis has no verdict for (Redis came back empty). KEYS: state,
/// day hash, life hash. ARGV: id, verdict, the day hash's time to live, the number of day fields, then the
/// day's fields and values, then the lifetime's. Returns 1 when written.
pub const SEED: &str = r#"
if redis.call('HEXISTS', KEYS[1], 's:' .. ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 's:' .. ARGV[1], ARGV[2], 'v:' .. ARGV[1], 1)
local n = tonumber(ARGV[4])
for i = 5, 4 + 2 * n, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
if n > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
for i = 5 + 2 * n, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
return 1
"#;

/// Extends the leases held (only those still there). KEYS: lease sets. ARGV: expiry, then one member per key.
pub const RENEW: &str = r#"
for i = 1, #KEYS do redis.call('ZADD', KEYS[i], 'XX', ARGV[1], ARGV[i + 1]) end
return 1
"#;
