//! The Lua scripts. Each runs atomically on the server, which is what makes the gates exact:
//! the off-hours flag is read in the same step that claims an entry, an ownership check and the
//! command it guards cannot be separated by another worker, and a dead letter is written before
//! (and only if) its entry is acked.
//!
//! Redis does not roll a script back when a command in it fails. So every script runs its
//! checks first and orders its writes so that an error part-way leaves nothing lost: `XADD` to
//! the destination before `XACK`/`XDEL` at the source.
//!
//! Needs Redis ≥ 6.2 (`XAUTOCLAIM`, `XPENDING … IDLE`, exclusive `(` ranges); 7.0 adds
//! `XAUTOCLAIM`'s list of deleted ids, which 6.2 reports as entries without fields (handled).

use std::sync::LazyLock;

use redis::Script;

/// Shared helpers: the off-hours check (which also gives a flag written without a TTL the
/// maximum one, so no writer in any language can wedge the system) and the cheap/costly test.
///
/// An entry counts as **non-costly only if** its `job` field parses as a JSON object whose
/// `action` is one of the non-costly actions passed in by the Rust side (from
/// `Action::is_costly`). Anything else — costly actions, unknown actions, bad JSON, a missing
/// or repeated `job` field — is treated as costly and held while the flag exists; poison is
/// dead-lettered after the flag goes. Erring this way means a message Lua cannot read can
/// never slip GPU work past the gate.
const PRELUDE: &str = r#"
local function off_hours(flag_key, max_ttl)
  local ttl = redis.call('PTTL', flag_key)
  if ttl == -2 then return false, 0 end
  if ttl == -1 then
    redis.call('PEXPIRE', flag_key, max_ttl)
    return true, 1
  end
  return true, 0
end

local function make_cheap(first)
  local cheap = {}
  for i = first, #ARGV do cheap[ARGV[i]] = true end
  return cheap
end

local function is_cheap(cheap, flat)
  local job = nil
  for i = 1, #flat, 2 do
    if flat[i] == 'job' then
      if job ~= nil then return false end
      job = flat[i + 1]
    end
  end
  if job == nil then return false end
  local ok, msg = pcall(cjson.decode, job)
  if not ok or type(msg) ~= 'table' then return false end
  local action = msg['action']
  return type(action) == 'string' and cheap[action] == true
end

local function last_delivered(stream, group)
  if redis.call('EXISTS', stream) == 0 then return nil end
  local groups = redis.call('XINFO', 'GROUPS', stream)
  for _, g in ipairs(groups) do
    local name, last = nil, nil
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] end
      if g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if name == group then return last end
  end
  return nil
end

local function delivery_count(stream, group, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 0 then return 0 end
  return p[1][4]
end
"#;

/// Claim the next new entry, interactive first.
///
/// KEYS: interactive stream, bulk stream, off-hours flag.
/// ARGV: group, consumer, allow_costly (`1`/`0`), max flag TTL (ms), non-costly actions…
///
/// Ungated (costly allowed and no flag): a plain `XREADGROUP … COUNT 1 … >` per stream.
/// Gated: peek at the first undelivered entry (`XRANGE` from the group's last-delivered id,
/// exclusive); `XREADGROUP >` only if that entry is non-costly — inside one script, so the
/// `>` read delivers exactly the entry that was inspected. A costly head is left undelivered.
///
/// Returns `{1, healed, lane_index, id, fields}` or `{0, healed, tail1, tail2, held}` where the
/// tails are each stream's newest id (for the caller's `XREAD BLOCK`) and `held` counts streams
/// whose head was held back by the gate.
const CLAIM: &str = r#"
local group, consumer = ARGV[1], ARGV[2]
local flag, healed = off_hours(KEYS[3], tonumber(ARGV[4]))
local gated = flag or ARGV[3] ~= '1'
local cheap = make_cheap(5)
local held = 0
for i = 1, 2 do
  local s = KEYS[i]
  local take = true
  if gated then
    local last = last_delivered(s, group)
    if last == nil then
      return redis.error_reply('NOGROUP consumer group ' .. group .. ' is missing on ' .. s)
    end
    local head = redis.call('XRANGE', s, '(' .. last, '+', 'COUNT', 1)
    if #head == 0 then
      take = false
    elseif not is_cheap(cheap, head[1][2]) then
      take = false
      held = held + 1
    end
  end
  if take then
    local r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', s, '>')
    if type(r) == 'table' and r.err then return redis.error_reply(r.err) end
    if r and r[1] and r[1][2][1] then
      local e = r[1][2][1]
      return {1, healed, i, e[1], e[2]}
    end
  end
end
local tails = {}
for i = 1, 2 do
  local t = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  if #t > 0 then tails[i] = t[1][1] else tails[i] = '0-0' end
end
return {0, healed, tails[1], tails[2], held}
"#;

/// Take over pending entries: idle ones of any consumer (reclaim after a crash), or this
/// consumer's own (re-read at start-up).
///
/// KEYS: stream, off-hours flag.
/// ARGV: group, consumer, min_idle_ms, count, allow_costly, max flag TTL (ms), own_only
/// (`1`/`0`), non-costly actions…
///
/// Ungated reclaim uses `XAUTOCLAIM` (following its cursor for a few rounds). Gated reclaim and
/// every own-pending re-read walk `XPENDING … IDLE` and `XCLAIM` entry by entry, skipping
/// costly ones while gated; `XCLAIM`'s min-idle re-check makes two reclaimers unable to both
/// take one entry. Entries that were deleted from the stream while pending are collected,
/// `XACK`ed (so they do not linger) and returned.
///
/// Returns `{healed, {{id, fields, delivery_count}…}, {deleted_id…}, held}`.
const TAKE_PENDING: &str = r#"
local s = KEYS[1]
local group, consumer = ARGV[1], ARGV[2]
local min_idle, count = tonumber(ARGV[3]), tonumber(ARGV[4])
local flag, healed = off_hours(KEYS[2], tonumber(ARGV[6]))
local gated = flag or ARGV[5] ~= '1'
local own = ARGV[7] == '1'
local cheap = make_cheap(8)
if last_delivered(s, group) == nil then
  return redis.error_reply('NOGROUP consumer group ' .. group .. ' is missing on ' .. s)
end
local claimed, deleted, held = {}, {}, 0
if not gated and not own then
  local cursor = '0-0'
  for round = 1, 10 do
    local r = redis.call('XAUTOCLAIM', s, group, consumer, min_idle, cursor, 'COUNT', count - #claimed)
    cursor = r[1]
    for _, e in ipairs(r[2]) do
      if type(e) == 'table' and type(e[2]) == 'table' then
        claimed[#claimed + 1] = {e[1], e[2], delivery_count(s, group, e[1])}
      elseif type(e) == 'table' and e[1] then
        deleted[#deleted + 1] = e[1]
      end
    end
    if r[3] then
      for _, id in ipairs(r[3]) do deleted[#deleted + 1] = id end
    end
    if cursor == '0-0' or #claimed >= count then break end
  end
else
  local start = '-'
  local scanned = 0
  while #claimed < count and scanned < 1000 do
    local p
    if own then
      p = redis.call('XPENDING', s, group, 'IDLE', min_idle, start, '+', 100, consumer)
    else
      p = redis.call('XPENDING', s, group, 'IDLE', min_idle, start, '+', 100)
    end
    if #p == 0 then break end
    for _, pe in ipairs(p) do
      local id = pe[1]
      scanned = scanned + 1
      local e = redis.call('XRANGE', s, id, id)
      if #e == 0 then
        deleted[#deleted + 1] = id
      elseif (not gated) or is_cheap(cheap, e[1][2]) then
        local c = redis.call('XCLAIM', s, group, consumer, min_idle, id)
        if #c > 0 and type(c[1]) == 'table' and type(c[1][2]) == 'table' then
          claimed[#claimed + 1] = {c[1][1], c[1][2], delivery_count(s, group, id)}
        end
      else
        held = held + 1
      end
      if #claimed >= count then break end
    end
    start = '(' .. p[#p][1]
  end
end
for _, id in ipairs(deleted) do redis.call('XACK', s, group, id) end
return {healed, claimed, deleted, held}
"#;

/// Act on an entry only while this consumer still owns it.
///
/// KEYS: stream. ARGV: group, consumer, id, mode, idle_ms.
/// mode `renew`: `XCLAIM … 0 id JUSTID` (resets the idle time, keeps the delivery count);
/// `release`: `XCLAIM … IDLE idle RETRYCOUNT count-1 JUSTID` (claimable at once by any
/// reclaimer, and the interrupted attempt is not counted); `retry`: `XCLAIM … IDLE idle JUSTID`
/// (claimable once `lease - delay` more has passed).
///
/// Returns `{1, ''}` done, `{0, ''}` no longer pending, `{-1, owner}` owned by another consumer,
/// `{-2, ''}` deleted from the stream while pending (Redis ≥ 7 drops it from the PEL).
const OWNED: &str = r#"
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if type(p) == 'table' and p.err then
  if string.find(p.err, 'NOGROUP', 1, true) then return {0, ''} end
  return redis.error_reply(p.err)
end
if #p == 0 then return {0, ''} end
if p[1][2] ~= ARGV[2] then return {-1, p[1][2]} end
local c
if ARGV[4] == 'release' then
  local n = p[1][4] - 1
  if n < 0 then n = 0 end
  c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[5], 'RETRYCOUNT', n, 'JUSTID')
elseif ARGV[4] == 'retry' then
  c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[5], 'JUSTID')
else
  c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
end
if #c == 0 then return {-2, ''} end
return {1, ''}
"#;

/// Dead-letter an entry this consumer owns: `XADD dead` first, then `XACK`.
///
/// KEYS: stream, dead stream. ARGV: group, consumer, id, field/value pairs for the dead entry…
/// Returns `{1, dead_id}`, `{0, ''}` (not pending: already acked or dead-lettered — so a
/// repeated call cannot write a second dead letter) or `{-1, owner}`.
const DEAD_LETTER: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 then return {0, ''} end
if p[1][2] ~= ARGV[2] then return {-1, p[1][2]} end
local args = {}
for i = 4, #ARGV do args[#args + 1] = ARGV[i] end
local dead_id = redis.call('XADD', KEYS[2], '*', unpack(args))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return {1, dead_id}
"#;

/// Move a dead letter back to the stream it came from: `XADD` the original fields, then `XDEL`.
///
/// KEYS: dead stream, interactive stream, bulk stream. ARGV: dead id, metadata field names…
/// Returns `{1, new_id, lane}` or `{0, '', ''}` when the dead letter does not exist.
const REQUEUE: &str = r#"
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return {0, '', ''} end
local meta = {}
for i = 2, #ARGV do meta[ARGV[i]] = true end
local f = e[1][2]
local lane = nil
local out = {}
for i = 1, #f, 2 do
  if f[i] == 'stream' then lane = f[i + 1] end
  if not meta[f[i]] then
    out[#out + 1] = f[i]
    out[#out + 1] = f[i + 1]
  end
end
local target
if lane == 'interactive' then target = KEYS[2] elseif lane == 'bulk' then target = KEYS[3] else
  return redis.error_reply('ERR dead letter ' .. ARGV[1] .. ' names no known stream')
end
if #out == 0 then
  return redis.error_reply('ERR dead letter ' .. ARGV[1] .. ' has no original fields')
end
local new_id = redis.call('XADD', target, '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[1])
return {1, new_id, lane}
"#;

/// Trim entries every consumer is done with: below the oldest pending entry, or below the
/// first undelivered one when nothing is pending. Nothing pending or unread is ever removed.
///
/// KEYS: stream. ARGV: group. Returns the number of entries removed.
const TRIM: &str = r#"
local last = last_delivered(KEYS[1], ARGV[1])
if last == nil then return 0 end
local summary = redis.call('XPENDING', KEYS[1], ARGV[1])
if summary[1] > 0 then
  return redis.call('XTRIM', KEYS[1], 'MINID', summary[2])
end
local nxt = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
if #nxt > 0 then
  return redis.call('XTRIM', KEYS[1], 'MINID', nxt[1][1])
end
return redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
"#;

/// Compare-and-`PEXPIRE` for the run-once key. KEYS: key. ARGV: token, ttl_ms.
const RUN_RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Compare-and-`DEL` for the run-once key. KEYS: key. ARGV: token.
const RUN_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Gives a flag found without a TTL the maximum one. KEYS: flag. ARGV: max ttl (ms).
/// Returns the remaining TTL in ms, or -2 when the flag does not exist.
const OFF_HOURS_STATUS: &str = r#"
local _, healed = off_hours(KEYS[1], tonumber(ARGV[1]))
local ttl = redis.call('PTTL', KEYS[1])
return {ttl, healed}
"#;

fn with_prelude(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

pub(crate) static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(CLAIM));
pub(crate) static TAKE_PENDING_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_prelude(TAKE_PENDING));
pub(crate) static OWNED_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(OWNED));
pub(crate) static DEAD_LETTER_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_prelude(DEAD_LETTER));
pub(crate) static REQUEUE_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(REQUEUE));
pub(crate) static TRIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_prelude(TRIM));
pub(crate) static RUN_RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RUN_RENEW));
pub(crate) static RUN_RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RUN_RELEASE));
pub(crate) static OFF_HOURS_STATUS_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| with_prelude(OFF_HOURS_STATUS));
