//! The layout of the shared state in Redis (`state: {backend: redis}`,
//! docs/adr/033) that every host uses, so that gateways and nginx nodes on
//! one Redis and prefix share one limit and one quota per key: the key
//! names ([`Layout`]) and the scripts that change them atomically. The
//! scripts run the token-bucket arithmetic of [`crate::policy::limits`]
//! inside Redis (where it must be atomic across processes).

use crate::policy::fleet::{KeyLevels, SettleReply, Settlement};

/// Key names under a prefix (`llmproxy:` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// The layout under `prefix`.
    pub fn new(prefix: &str) -> Layout {
        Layout {
            prefix: prefix.to_owned(),
        }
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut s = self.prefix.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                s.push(':');
            }
            s.push_str(p);
        }
        s
    }

    /// The global requests-per-minute bucket.
    pub fn global_rpm(&self) -> String {
        self.key(&["g", "rpm"])
    }

    /// A key's requests-per-minute bucket (`id`: the key's fingerprint).
    pub fn key_rpm(&self, id: &str) -> String {
        self.key(&["k", id, "rpm"])
    }

    /// A key's tokens-per-minute bucket.
    pub fn key_tpm(&self, id: &str) -> String {
        self.key(&["k", id, "tpm"])
    }

    /// A key's concurrency slots (a hash: instance -> requests in flight).
    pub fn key_slots(&self, id: &str) -> String {
        self.key(&["k", id, "slots"])
    }

    /// A key's quota usage (a hash: `used`, `cfg`, `reset`).
    pub fn quota(&self, id: &str) -> String {
        self.key(&["q", id])
    }

    /// An instance's announcement (its slots count while it lives).
    pub fn instance(&self, instance: &str) -> String {
        self.key(&["inst", instance])
    }

    /// The number of the last settlement applied for an instance
    /// ([`SETTLE`]).
    pub fn settled(&self, instance: &str) -> String {
        self.key(&["settled", instance])
    }
}

/// How long an instance's announcement lives (ms); renewed every
/// [`HEARTBEAT_MS`].
pub const INSTANCE_TTL_MS: u64 = 15_000;

/// How often an instance renews its announcement (ms).
pub const HEARTBEAT_MS: u64 = 5_000;

/// Every script by name (the Lua module exports them so).
pub const SCRIPTS: [(&str, &str); 6] = [
    ("acquire", ACQUIRE),
    ("refund", REFUND),
    ("release", RELEASE),
    ("charge", CHARGE),
    ("sync_key", SYNC_KEY),
    ("settle", SETTLE),
];

/// What the bucket scripts share: `now` (Redis' clock, ms), `refill(key,
/// limit)` (a bucket's tokens now, `policy::limits`' arithmetic: a missing
/// bucket is full, a bucket filled for another limit keeps what was used of
/// it, ADR 041) and `save(key, tokens, limit)` (kept until full again).
macro_rules! buckets_lua {
    () => {
        r#"
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local function refill(key, limit)
  local v = redis.call('HMGET', key, 't', 'ts', 'c')
  local t, ts, c = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  if t == nil or ts == nil then return limit end
  -- Filled for another limit (a reload changed it): keep what was used
  -- of the old one, so a raised limit admits at once (ADR 041).
  if c and c ~= limit then
    t = t + (limit - c)
    if t > limit then t = limit end
  end
  local dt = now - ts
  if dt < 0 then dt = 0 end
  t = t + dt * limit / 60000
  if t > limit then t = limit end
  return t
end
local function save(key, t, limit)
  redis.call('HSET', key, 't', tostring(t), 'ts', tostring(now), 'c', tostring(limit))
  local ttl = 60000
  if t < limit then ttl = ttl + math.ceil((limit - t) * 60000 / limit) end
  redis.call('PEXPIRE', key, ttl)
end
"#
    };
}

/// Check the quota (when asked), the limits, and take a request.
/// KEYS: global rpm bucket, key rpm bucket, key tpm bucket, key slots,
/// key quota. ARGV: global_rpm, key_rpm, key_tpm, key_concurrency,
/// instance, instance key prefix, has_key, quota_total (0: no check), force.
pub const ACQUIRE: &str = concat!(
    buckets_lua!(),
    r#"
local grpm, krpm, ktpm, kconc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local has_key = ARGV[7] == '1'
local quota_total = tonumber(ARGV[8])
local force = ARGV[9] == '1'
local used = 0
if has_key then used = tonumber(redis.call('HGET', KEYS[5], 'used') or '0') end
if quota_total > 0 and used >= quota_total then
  return {'quota', '0', '-1', '-1', '0', tostring(used)}
end
local deny, retry = '', 0
local function refuse(kind, wait)
  if deny == '' then deny = kind; retry = wait end
end
local g, k, tp
if grpm > 0 then
  g = refill(KEYS[1], grpm)
  if g < 1 then refuse('global_rpm', (1 - g) * 60 / grpm) end
end
if has_key and krpm > 0 then
  k = refill(KEYS[2], krpm)
  if k < 1 then refuse('key_rpm', (1 - k) * 60 / krpm) end
end
if has_key and ktpm > 0 then
  tp = refill(KEYS[3], ktpm)
  if tp <= 0 then refuse('key_tpm', (1 - tp) * 60 / ktpm) end
end
local conc = 0
if has_key then
  local h = redis.call('HGETALL', KEYS[4])
  for i = 1, #h, 2 do
    if redis.call('EXISTS', ARGV[6] .. h[i]) == 1 then
      conc = conc + tonumber(h[i + 1])
    else
      redis.call('HDEL', KEYS[4], h[i])
    end
  end
  if kconc > 0 and conc >= kconc then refuse('key_concurrency', 1) end
end
if deny == '' or force then
  if g then g = g - 1 end
  if k then k = k - 1 end
  if has_key then
    redis.call('HINCRBY', KEYS[4], ARGV[5], 1)
    redis.call('PEXPIRE', KEYS[4], 86400000)
    conc = conc + 1
  end
  if force then deny = '' end
end
local grem, krem = -1, -1
if g then save(KEYS[1], g, grpm); grem = math.max(0, math.floor(g)) end
if k then save(KEYS[2], k, krpm); krem = math.max(0, math.floor(k)) end
if tp then save(KEYS[3], tp, ktpm) end
if deny == '' then deny = 'ok' end
return {deny, tostring(retry), tostring(grem), tostring(krem), tostring(conc), tostring(used)}
"#
);

/// Give back one request. KEYS: global rpm, key rpm, key slots. ARGV:
/// global_rpm, key_rpm, instance, has_key.
pub const REFUND: &str = r#"
local function give(key, limit)
  if limit > 0 then
    local t = tonumber(redis.call('HGET', key, 't'))
    if t then
      t = t + 1
      if t > limit then t = limit end
      redis.call('HSET', key, 't', tostring(t))
    end
  end
end
give(KEYS[1], tonumber(ARGV[1]))
if ARGV[4] == '1' then
  give(KEYS[2], tonumber(ARGV[2]))
  local n = redis.call('HINCRBY', KEYS[3], ARGV[3], -1)
  if n <= 0 then redis.call('HDEL', KEYS[3], ARGV[3]) end
end
return 1
"#;

/// Free a slot. KEYS: key slots. ARGV: instance.
pub const RELEASE: &str = r#"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"#;

/// Charge a finished request. KEYS: key quota, key tpm bucket. ARGV:
/// billable, tokens, key_tpm, answered (Unix ms: not charged to the quota
/// when the key was reset after it, field `reset`, docs/adr/043).
pub const CHARGE: &str = concat!(
    buckets_lua!(),
    r#"
local used
if tonumber(ARGV[4]) >= tonumber(redis.call('HGET', KEYS[1], 'reset') or '0') then
  used = redis.call('HINCRBY', KEYS[1], 'used', tonumber(ARGV[1]))
else
  used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
end
local ktpm, tokens = tonumber(ARGV[3]), tonumber(ARGV[2])
if ktpm > 0 and tokens > 0 then
  save(KEYS[2], refill(KEYS[2], ktpm) - tokens, ktpm)
end
return used
"#
);

/// Start or reset a key's usage. KEYS: key quota. ARGV: configured used.
pub const SYNC_KEY: &str = r#"
local cfg = redis.call('HGET', KEYS[1], 'cfg')
if cfg ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'used', ARGV[1], 'cfg', ARGV[1])
  return tonumber(ARGV[1])
end
return tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
"#;

/// Apply one node's settlement (`policy::fleet`, `mode: batched`) and
/// answer the fleet's counters. KEYS: global rpm bucket, the node's
/// last-applied key ([`Layout::settled`]), then per key: rpm bucket, tpm
/// bucket, slots, quota. ARGV: seq, instance, instance key prefix,
/// global_rpm, global taken, key_rpm, key_tpm, then per key: taken,
/// tokens, billable, last answered (Unix ms), in flight on this node.
/// Deltas are applied only when seq is above the last one applied (a
/// settlement sent again after a lost answer is not counted twice); the
/// node's slots are set, not added. Answers: applied (1/0), the global
/// level, then per key: rpm level, tpm level ('' for a limit not set),
/// requests in flight on the other live nodes, quota used.
pub const SETTLE: &str = concat!(
    buckets_lua!(),
    r#"
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local apply = tonumber(ARGV[1]) > last
if apply then redis.call('SET', KEYS[2], ARGV[1], 'PX', 86400000) end
local function settle(key, limit, take)
  if limit <= 0 then return '' end
  local t = refill(key, limit)
  if apply and take ~= 0 then
    t = t - take
    if t > limit then t = limit end
    save(key, t, limit)
  end
  return tostring(t)
end
local krpm, ktpm = tonumber(ARGV[6]), tonumber(ARGV[7])
local out = {apply and '1' or '0', settle(KEYS[1], tonumber(ARGV[4]), tonumber(ARGV[5]))}
for i = 0, (#KEYS - 2) / 4 - 1 do
  local k, a = 3 + i * 4, 8 + i * 5
  out[#out + 1] = settle(KEYS[k], krpm, tonumber(ARGV[a]))
  out[#out + 1] = settle(KEYS[k + 1], ktpm, tonumber(ARGV[a + 1]))
  if tonumber(ARGV[a + 4]) > 0 then
    redis.call('HSET', KEYS[k + 2], ARGV[2], ARGV[a + 4])
    redis.call('PEXPIRE', KEYS[k + 2], 86400000)
  else
    redis.call('HDEL', KEYS[k + 2], ARGV[2])
  end
  local others = 0
  local h = redis.call('HGETALL', KEYS[k + 2])
  for j = 1, #h, 2 do
    if h[j] ~= ARGV[2] then
      if redis.call('EXISTS', ARGV[3] .. h[j]) == 1 then
        others = others + tonumber(h[j + 1])
      else
        redis.call('HDEL', KEYS[k + 2], h[j])
      end
    end
  end
  local billable, used = tonumber(ARGV[a + 2]), nil
  if apply and billable > 0
      and tonumber(ARGV[a + 3]) >= tonumber(redis.call('HGET', KEYS[k + 3], 'reset') or '0') then
    used = redis.call('HINCRBY', KEYS[k + 3], 'used', billable)
  else
    used = tonumber(redis.call('HGET', KEYS[k + 3], 'used') or '0')
  end
  out[#out + 1] = tostring(others)
  out[#out + 1] = tostring(used)
end
return out
"#
);

/// The KEYS and ARGV of [`SETTLE`] for settlement `s` of `instance`.
pub fn settle_call(layout: &Layout, instance: &str, s: &Settlement) -> (Vec<String>, Vec<String>) {
    let mut keys = Vec::with_capacity(2 + 4 * s.keys.len());
    keys.push(layout.global_rpm());
    keys.push(layout.settled(instance));
    let mut args = Vec::with_capacity(7 + 5 * s.keys.len());
    args.extend([
        s.seq.to_string(),
        instance.to_owned(),
        layout.instance(""),
        s.rates.global_rpm.to_string(),
        s.global_taken.to_string(),
        s.rates.key_rpm.to_string(),
        s.rates.key_tpm.to_string(),
    ]);
    for k in &s.keys {
        keys.extend([
            layout.key_rpm(&k.key),
            layout.key_tpm(&k.key),
            layout.key_slots(&k.key),
            layout.quota(&k.key),
        ]);
        args.extend([
            k.delta.taken.to_string(),
            k.delta.tokens.to_string(),
            k.delta.billable.to_string(),
            k.delta.last_answered_ms.to_string(),
            k.in_flight.to_string(),
        ]);
    }
    (keys, args)
}

/// Read [`SETTLE`]'s answer for a settlement of `keys` keys.
pub fn parse_settle_reply(items: &[String], keys: usize) -> Result<SettleReply, String> {
    if items.len() != 2 + 4 * keys {
        return Err(format!("settle: {} items for {keys} keys", items.len()));
    }
    let level = |s: &str| -> Result<Option<f64>, String> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse::<f64>()
            .map(Some)
            .map_err(|_| format!("settle: bad level '{s}'"))
    };
    let count = |s: &str| -> Result<u64, String> {
        s.parse::<f64>()
            .map(|v| v.max(0.0) as u64)
            .map_err(|_| format!("settle: bad count '{s}'"))
    };
    let mut reply = SettleReply {
        global: level(&items[1])?,
        keys: Vec::with_capacity(keys),
    };
    for c in items[2..].chunks_exact(4) {
        reply.keys.push(KeyLevels {
            rpm: level(&c[0])?,
            tpm: level(&c[1])?,
            others_in_flight: count(&c[2])?,
            used: count(&c[3])?,
        });
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_stable() {
        let l = Layout::new("llmproxy:");
        assert_eq!(
            [
                l.global_rpm(),
                l.key_rpm("fp"),
                l.key_tpm("fp"),
                l.key_slots("fp"),
                l.quota("fp"),
                l.instance("i1"),
                l.instance(""),
            ],
            [
                "llmproxy:g:rpm",
                "llmproxy:k:fp:rpm",
                "llmproxy:k:fp:tpm",
                "llmproxy:k:fp:slots",
                "llmproxy:q:fp",
                "llmproxy:inst:i1",
                "llmproxy:inst:",
            ]
        );
    }
}
