//! The server-side scripts of the Redis store. Each runs atomically on the keys of one provider (all hash-tagged
//! `{prefix:provider}`, so a Cluster keeps them in one slot) and takes the caller's time as an argument.
//!
//! The rules are not here: the Rust policy decides which key serves and what an outcome does to a key; these
//! only read, check that a decision still holds, and write. What they keep per provider:
//! - `state`, a hash: `s:<id>` the key's verdict (cooldowns, streaks, manual state) as JSON, `v:<id>` its
//!   version, bumped on every change of verdict;
//! - `leases`, a sorted set of the leases in flight (`<id>:<instance>:<lease>:<model>`) scored by their
//!   expiry, and `inflight`, a hash of their counts per key (`<id>`) and per key and model (`<id>:<model>`):
//!   every script that reads the counts first frees the leases whose holder stopped renewing them, and notes
//!   them in `expired` for a day (so that an outcome given later is still known to be new);
//! - `day:<day start>` and `life`, hashes of counters (`<id>:<counter>:<model>`, and `<id>:requests` for the
//!   key), added to with `HINCRBY` so that they never conflict; a day's hash expires two days after its last
//!   write;
//! - `requests:<id>` and `tokens:<id>`, the key's requests and tokens over the last minute (shared windows);
//! - `pause` (the provider's pause, until) and `limited` (its keys rate-limited lately);
//! - `cursor`, a hash: the key each model stays on under sequential selection;
//! - `done:<op>`, for a day: an outcome given after an outage that was applied (it is not applied twice);
//! - `alive`: when the provider's state began (its first claim, or an instance writing back what it knows):
//!   gone, or newer than an instance last saw, means Redis lost what it had before.

/// The helpers every script that reads or frees leases starts with: `free` ends one lease (once: a lease freed
/// twice is freed once), `expire` ends those whose holder stopped renewing them, and `hmget` reads any number
/// of fields (Lua's `unpack` is limited to a few thousand values).
macro_rules! leases {
    () => {
        r#"
local function free(leases, inflight, member)
  if redis.call('ZREM', leases, member) == 0 then return end
  local id, model = string.match(member, '^([^:]+):[^:]+:[^:]+:(.*)$')
  if not id then return end
  for _, field in ipairs({id, id .. ':' .. model}) do
    if redis.call('HINCRBY', inflight, field, -1) <= 0 then redis.call('HDEL', inflight, field) end
  end
end
local function expire(leases, inflight, expired, now)
  local gone = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  for _, member in ipairs(gone) do
    free(leases, inflight, member)
    redis.call('ZADD', expired, now, member)
  end
  if #gone > 0 then
    redis.call('ZREMRANGEBYSCORE', expired, '-inf', now - 86400000)
    redis.call('PEXPIRE', expired, 86400000)
  end
end
local function hmget(key, fields)
  local out = {}
  for i = 1, #fields, 1000 do
    local part = redis.call('HMGET', key, unpack(fields, i, math.min(i + 999, #fields)))
    for j = 1, #part do out[#out + 1] = part[j] end
  end
  return out
end
"#
    };
}

/// `read(now, model, first)`: what choosing a key for `model` needs, for the keys given from `ARGV[first]` on
/// as pairs of id and the version of its verdict the caller knows (-1: none), with KEYS: state, pause, cursor,
/// day hash, leases, in-flight counts, expired leases. Returns the pause's end (0: none), the model's cursor
/// (""), then per key: its verdict ("": none; nil: the version the caller knows), version, leases of the key,
/// leases of the key and model, today's requests for the model, today's requests for the key.
macro_rules! read {
    () => {
        r#"
local function read(now, model, first)
  expire(KEYS[5], KEYS[6], KEYS[7], now)
  local out = {}
  out[1] = tonumber(redis.call('GET', KEYS[2]) or '0')
  out[2] = redis.call('HGET', KEYS[3], model) or ''
  if #ARGV < first then return out end
  local states, counts, inflight = {}, {}, {}
  local known = {}
  for i = first, #ARGV, 2 do
    local id = ARGV[i]
    known[#known + 1] = tonumber(ARGV[i + 1])
    states[#states + 1] = 's:' .. id
    states[#states + 1] = 'v:' .. id
    counts[#counts + 1] = id .. ':requests:' .. model
    counts[#counts + 1] = id .. ':requests'
    inflight[#inflight + 1] = id
    inflight[#inflight + 1] = id .. ':' .. model
  end
  states = hmget(KEYS[1], states)
  counts = hmget(KEYS[4], counts)
  inflight = hmget(KEYS[6], inflight)
  for k = 1, #states, 2 do
    local version = tonumber(states[k + 1] or '0')
    if version == known[(k + 1) / 2] then out[#out + 1] = false else out[#out + 1] = states[k] or '' end
    out[#out + 1] = version
    out[#out + 1] = tonumber(inflight[k] or '0')
    out[#out + 1] = tonumber(inflight[k + 1] or '0')
    out[#out + 1] = tonumber(counts[k] or '0')
    out[#out + 1] = tonumber(counts[k + 1] or '0')
  end
  return out
end
"#
    };
}

/// What choosing a key needs (see `read!`). KEYS: state, pause, cursor, day hash, leases, in-flight counts,
/// expired leases. ARGV: now, model, then per key its id and the version of its verdict known.
pub const READ: &str = concat!(
    leases!(),
    read!(),
    r#"
return read(tonumber(ARGV[1]), ARGV[2], 3)
"#
);

/// Claims a lease if the key is still eligible: the provider not paused, the key not disabled, not cooling (whole
/// key or this model), under its caps, and within its declared limits (requests and tokens per minute, requests
/// per day): every rule that depends on the pool, since the choice may have been made on an older reading. A
/// claim counts the request, and can read what the next choice needs in the same round trip. KEYS: state, pause,
/// cursor, day hash, leases, in-flight counts, expired leases, life hash, the key's request window, its token
/// window, the provider's `alive` mark (set if missing, to when). ARGV: now, model, id, member, lease expiry, cap per key (0: none), cap per key and model, requests
/// per minute (0: none), tokens per minute (0: none), requests per day (0: none), the next daily reset, the day
/// hash's time to live, 1 to move the model's cursor to this key, 1 to read as well, then the provider's keys
/// as `read!` takes them. Returns 1 when claimed, 0 when the key is not eligible, or the time a window or the
/// day's quota has room again; then, when asked, what `read` returns, as it is after the claim.
pub const CLAIM: &str = concat!(
    leases!(),
    read!(),
    r#"
local now, model, id, member = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local expiry, per_key, per_model = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local rpm, tpm, rpd = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local function claim()
  if tonumber(redis.call('GET', KEYS[2]) or '0') > now then return 0 end
  local raw = redis.call('HGET', KEYS[1], 's:' .. id)
  if raw then
    local s = cjson.decode(raw)
    if s.disabled then return 0 end
    if type(s.cooldown) == 'table' and s.cooldown['until'] > now then return 0 end
    local m = type(s.models) == 'table' and s.models[model]
    if type(m) == 'table' and type(m.cooldown) == 'table' and m.cooldown['until'] > now then return 0 end
  end
  expire(KEYS[5], KEYS[6], KEYS[7], now)
  local held = redis.call('HMGET', KEYS[6], id, id .. ':' .. model)
  if per_key > 0 and tonumber(held[1] or '0') >= per_key then return 0 end
  if per_model > 0 and tonumber(held[2] or '0') >= per_model then return 0 end
  if rpd > 0 and tonumber(redis.call('HGET', KEYS[4], id .. ':requests') or '0') >= rpd then
    return tonumber(ARGV[11])
  end
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now - 60000)
    if redis.call('ZCARD', KEYS[9]) >= rpm then
      local oldest = redis.call('ZRANGE', KEYS[9], 0, 0, 'WITHSCORES')
      return tonumber(oldest[2]) + 60000
    end
  end
  if tpm > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', now - 60000)
    local used = 0
    for _, entry in ipairs(redis.call('ZRANGE', KEYS[10], 0, -1)) do
      used = used + tonumber(string.match(entry, '^(%d+)'))
    end
    if used >= tpm then
      local oldest = redis.call('ZRANGE', KEYS[10], 0, 0, 'WITHSCORES')
      return tonumber(oldest[2]) + 60000
    end
  end
  redis.call('ZADD', KEYS[5], expiry, member)
  redis.call('HINCRBY', KEYS[6], id, 1)
  redis.call('HINCRBY', KEYS[6], id .. ':' .. model, 1)
  if rpm > 0 then
    redis.call('ZADD', KEYS[9], now, member)
    redis.call('PEXPIRE', KEYS[9], 61000)
  end
  for _, h in ipairs({KEYS[4], KEYS[8]}) do
    redis.call('HINCRBY', h, id .. ':requests:' .. model, 1)
    redis.call('HINCRBY', h, id .. ':requests', 1)
  end
  redis.call('HSET', KEYS[8], id .. ':last_used:' .. model, now)
  redis.call('PEXPIRE', KEYS[4], ARGV[12])
  if ARGV[13] == '1' then redis.call('HSET', KEYS[3], model, id) end
  redis.call('SET', KEYS[11], now, 'NX')
  return 1
end
local claimed = claim()
if ARGV[14] ~= '1' then return {claimed} end
local out = read(now, model, 15)
table.insert(out, 1, claimed)
return out
"#
);

/// Applies an outcome: frees its lease (idempotent), adds its counters, spends its tokens in the key's window,
/// writes the key's new verdict if its version is still the one the verdict was decided on, starts the
/// provider's pause when enough of its keys were rate-limited lately, and tells every instance that a key of
/// the provider may be free.
///
/// An outcome given after an outage (`replay`) is applied only if Redis has not seen it: its lease is still
/// held or expired unreleased, or (a lease granted while Redis was away) its `done:<op>` mark is not there yet.
///
/// KEYS: state, leases, in-flight counts, token window, day hash, life hash, pause, limited, expired leases,
/// the outcome's `done` mark. ARGV: id, member (""), channel, provider, now,
/// model (""), then the counts (requests, successes, failures, prompt tokens, completion tokens, cost), the day
/// hash's time to live, 1 to forget the model's counters if it never succeeded (a model the upstream refused),
/// the expected version, the verdict ("" leaves it), keys that pause the provider (0: no pause), their window,
/// the end of the rate-limit cooldown the outcome started (0), 1 for a replay, the outcome's id (replays of
/// leases granted while Redis was away), 1 to spend the tokens in the key's window (a tokens-per-minute limit
/// is declared). Returns: 1 when the verdict was written, 0 when its version had moved
/// (the caller decides again), -1 when none was given, 2 for a replay Redis had seen; the pause started (0);
/// the key and model's counters of the day and of its lifetime, in the order of `names` below, then its last
/// use.
pub const SETTLE: &str = concat!(
    leases!(),
    r#"
local id, member, now, model = ARGV[1], ARGV[2], tonumber(ARGV[5]), ARGV[6]
local names = {'requests', 'successes', 'failures', 'prompt_tokens', 'completion_tokens', 'cost_nano_usd'}
local fields = {}
for i, name in ipairs(names) do fields[i] = id .. ':' .. name .. ':' .. model end
fields[7] = id .. ':last_used:' .. model
local function counters()
  if model == '' then return {{}, {}} end
  return {redis.call('HMGET', KEYS[5], unpack(fields)), redis.call('HMGET', KEYS[6], unpack(fields))}
end
if ARGV[20] == '1' then
  if member ~= '' then
    if not redis.call('ZSCORE', KEYS[2], member) and redis.call('ZREM', KEYS[9], member) == 0 then
      local seen = counters()
      return {2, 0, seen[1], seen[2]}
    end
  elseif ARGV[21] ~= '' and not redis.call('SET', KEYS[10], '1', 'NX', 'PX', 86400000) then
    local seen = counters()
    return {2, 0, seen[1], seen[2]}
  end
end
if member ~= '' then
  free(KEYS[2], KEYS[3], member)
  redis.call('ZREM', KEYS[9], member)
end
-- Taking a request back (a claim that ran unbeknown to its instance) never takes a count below zero.
local add = {}
for i = 1, 6 do add[i] = ARGV[6 + i] end
if tonumber(add[1]) < 0 and tonumber(redis.call('HGET', KEYS[5], fields[1]) or '0') <= 0 then add[1] = '0' end
local counted = false
for i = 1, 6 do
  if add[i] ~= '0' then
    redis.call('HINCRBY', KEYS[5], fields[i], add[i])
    redis.call('HINCRBY', KEYS[6], fields[i], add[i])
    counted = true
  end
end
if add[1] ~= '0' then
  redis.call('HINCRBY', KEYS[5], id .. ':requests', add[1])
  redis.call('HINCRBY', KEYS[6], id .. ':requests', add[1])
  if tonumber(add[1]) > 0 then redis.call('HSET', KEYS[6], fields[7], now) end
end
if counted then redis.call('PEXPIRE', KEYS[5], ARGV[13]) end
-- A refused model leaves nothing, unless it ever succeeded or still serves a request.
if ARGV[14] == '1' and not redis.call('HGET', KEYS[6], fields[2]) and not redis.call('HGET', KEYS[3], id .. ':' .. model) then
  for _, h in ipairs({KEYS[5], KEYS[6]}) do
    local n = tonumber(redis.call('HGET', h, fields[1]) or '0')
    if n > 0 then redis.call('HINCRBY', h, id .. ':requests', -n) end
    redis.call('HDEL', h, fields[1], fields[3], fields[7])
  end
end
local tokens = tonumber(ARGV[10]) + tonumber(ARGV[11])
if tokens > 0 and ARGV[22] == '1' then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - 60000)
  redis.call('ZADD', KEYS[4], now, tokens .. ':' .. member .. ':' .. ARGV[21] .. ':' .. now)
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
local now_counted = counters()
return {written, paused, now_counted[1], now_counted[2]}
"#
);

/// The state of keys for operators. KEYS: state, day hash, life hash, leases, in-flight counts, expired leases,
/// pause. ARGV: now, then the ids. Returns the provider's counters of the day and of all time (every key's),
/// per key its verdict ("") and leases in flight, and the provider's pause's end (0: none).
pub const REPORT: &str = concat!(
    leases!(),
    r#"
expire(KEYS[4], KEYS[5], KEYS[6], tonumber(ARGV[1]))
local keys = {}
for i = 2, #ARGV do
  keys[#keys + 1] = {redis.call('HGET', KEYS[1], 's:' .. ARGV[i]) or '', tonumber(redis.call('HGET', KEYS[5], ARGV[i]) or '0')}
end
return {redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]), keys, tonumber(redis.call('GET', KEYS[7]) or '0')}
"#
);

/// Writes what an instance knows of a key that Redis has no verdict for (Redis lost the provider's state).
/// Counters already there (other instances' requests since) are left as they are. KEYS: state, day hash, life
/// hash. ARGV: id, verdict, the day hash's time to live, the number of day fields, then the day's fields
/// (without the key's id) and values, then the lifetime's. Returns 0 when the key has a verdict already, 2
/// when the day's counters were written too, else 1.
pub const SEED: &str = r#"
if redis.call('HEXISTS', KEYS[1], 's:' .. ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 's:' .. ARGV[1], ARGV[2], 'v:' .. ARGV[1], 1)
local n = tonumber(ARGV[4])
local id = ARGV[1] .. ':'
local written = 1
if redis.call('HEXISTS', KEYS[2], id .. 'requests') == 0 then
  for i = 5, 4 + 2 * n, 2 do redis.call('HSET', KEYS[2], id .. ARGV[i], ARGV[i + 1]) end
  if n > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
  written = 2
end
if redis.call('HEXISTS', KEYS[3], id .. 'requests') == 0 then
  for i = 5 + 2 * n, #ARGV, 2 do redis.call('HSET', KEYS[3], id .. ARGV[i], ARGV[i + 1]) end
end
return written
"#;

/// A key's verdict and its version, to decide again after a lost race. KEYS: state. ARGV: id.
pub const VERDICT: &str = r#"
return redis.call('HMGET', KEYS[1], 's:' .. ARGV[1], 'v:' .. ARGV[1])
"#;

/// Extends the leases held (only those still there). KEYS: leases. ARGV: expiry, then at most a thousand
/// members.
pub const RENEW: &str = r#"
local args = {}
for i = 2, #ARGV do
  args[#args + 1] = ARGV[1]
  args[#args + 1] = ARGV[i]
end
if #args > 0 then redis.call('ZADD', KEYS[1], 'XX', unpack(args)) end
return 1
"#;
