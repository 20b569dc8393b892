//! Shared limits at local speed (`state: {backend: redis, mode: batched}`,
//! docs/adr/051): one node's view of the fleet's counters. The node admits
//! from its view with the rule of [`super::limits`] and settles with the
//! shared store in batches: what it took and charged since the last
//! settlement goes out as deltas, and the store's answer (the fleet's
//! buckets, the other nodes' requests in flight, the quota usage) becomes
//! the new view.
//!
//! The bound: under each limit a node admits at most [`room`] requests the
//! fleet has not seen (1% of the limit, at least 1, at most `batch`); past
//! it, the next request of that key waits for a settlement. A fleet of N
//! nodes therefore admits at most N x room beyond what one exact counter
//! would. A key this node has not settled yet has no room: its first
//! request waits for one settlement, so a fresh node never admits a key
//! whose quota or limit the fleet has used up.
//!
//! Deltas are applied once: each settlement has a sequence number the store
//! remembers per node, and a settlement whose answer was lost is sent again
//! unchanged (the store skips it if it had applied it). While the store is
//! unreachable a host that fails open admits on its view with no room
//! check (local limits only) and keeps the deltas: they settle after
//! recovery. Concurrency is sent as this node's absolute count, never as a
//! delta.
//!
//! No I/O and no clock here: the host owns the lock, the timer and the
//! store calls (`shared_state::settle_args` builds the Redis call).

use std::collections::HashMap;
use std::sync::Arc;

use super::limits::{self, Bucket, Counters, Verdict};
use crate::config::LimitsConfig;

/// A node may admit 1/`ROOM_DIVISOR` of a limit unseen by the fleet.
pub const ROOM_DIVISOR: u64 = 100;

/// Keys one settlement carries at most (the rest go in the next one).
pub const MAX_KEYS_PER_SETTLEMENT: usize = 256;

/// A key view unused this long (ms) may be forgotten.
const IDLE_MS: f64 = 60_000.0;

/// A key in use is settled at least this often (ms), even with nothing to
/// send: its view then learns other nodes' slots and quota resets.
pub const REFRESH_MS: f64 = 1_000.0;

/// Views kept before idle ones are swept out.
const SWEEP_AT: usize = 4_096;

/// Requests a node may admit under `limit` before the fleet has seen them:
/// 1% of the limit, at least 1, at most `batch`.
pub fn room(limit: u64, batch: u64) -> u64 {
    (limit / ROOM_DIVISOR).clamp(1, batch.max(1))
}

/// The rates a settlement refills the fleet's buckets with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// `limits.global_rpm`.
    pub global_rpm: u64,
    /// `limits.key_rpm`.
    pub key_rpm: u64,
    /// `limits.key_tpm`.
    pub key_tpm: u64,
}

impl Rates {
    fn of(l: &LimitsConfig) -> Rates {
        Rates {
            global_rpm: l.global_rpm,
            key_rpm: l.key_rpm,
            key_tpm: l.key_tpm,
        }
    }
}

/// What one key did on this node since a point in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta {
    /// Request tokens taken (refunds subtract).
    pub taken: i64,
    /// Tokens charged to the tokens-per-minute bucket.
    pub tokens: u64,
    /// Tokens charged to the quota.
    pub billable: u64,
    /// When the last charged request was answered (Unix ms): a quota reset
    /// after it wins over the whole delta (docs/adr/043).
    pub last_answered_ms: i64,
}

impl Delta {
    fn is_empty(&self) -> bool {
        self.taken == 0 && self.tokens == 0 && self.billable == 0
    }

    fn add(&mut self, o: &Delta) {
        self.taken += o.taken;
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.billable = self.billable.saturating_add(o.billable);
        self.last_answered_ms = self.last_answered_ms.max(o.last_answered_ms);
    }
}

/// One key in a settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySettlement {
    /// The key's fingerprint.
    pub key: Arc<str>,
    /// What this node did since the last settlement.
    pub delta: Delta,
    /// This node's requests of the key in flight now (absolute).
    pub in_flight: u64,
}

/// One batch of deltas for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// Increases by one per new settlement of this node; the store applies
    /// a settlement only if its number is above the last one applied.
    pub seq: u64,
    /// The rates in force when it was cut.
    pub rates: Rates,
    /// Request tokens taken from the global bucket.
    pub global_taken: i64,
    /// The keys, in the order the store answers them.
    pub keys: Vec<KeySettlement>,
}

/// The fleet's counters for one key, as the store answers a settlement.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KeyLevels {
    /// The key's request bucket (`None`: no `key_rpm`).
    pub rpm: Option<f64>,
    /// The key's token bucket (`None`: no `key_tpm`).
    pub tpm: Option<f64>,
    /// Requests of the key in flight on the other nodes.
    pub others_in_flight: u64,
    /// The key's quota usage.
    pub used: u64,
}

/// The store's answer to a settlement.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SettleReply {
    /// The global request bucket (`None`: no `global_rpm`).
    pub global: Option<f64>,
    /// One entry per key of the settlement, in its order.
    pub keys: Vec<KeyLevels>,
}

#[derive(Debug, Default)]
struct KeyView {
    /// The key (the map's, shared).
    key: Arc<str>,
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    /// This node's requests in flight.
    in_flight: u64,
    /// The other nodes' requests in flight at the last settlement.
    others: u64,
    /// The fleet's quota usage at the last settlement.
    used: u64,
    /// Not yet in a settlement.
    pending: Delta,
    /// In the settlement not yet answered.
    sent: Delta,
    /// The next settlement must carry this key (its slots or deltas
    /// changed, or it has never been settled); such a key is in
    /// [`Fleet::queue`] once.
    dirty: bool,
    /// A settlement has answered for this key since it was created.
    known: bool,
    touched_ms: f64,
    settled_ms: f64,
}

impl KeyView {
    /// Mark the key for the next settlement: `Some(key)` when it was not
    /// marked yet (the caller queues it).
    fn mark(&mut self) -> Option<Arc<str>> {
        (!std::mem::replace(&mut self.dirty, true)).then(|| Arc::clone(&self.key))
    }

    fn idle(&self, now_ms: f64) -> bool {
        self.in_flight == 0
            && !self.dirty
            && self.pending.is_empty()
            && self.sent.is_empty()
            && now_ms - self.touched_ms > IDLE_MS
    }

    fn unseen(&self) -> i64 {
        self.pending.taken + self.sent.taken
    }
}

/// Whether a request may be decided on the view now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Room {
    /// Within the room: decide locally.
    Free,
    /// Within the room, but half of it is used: decide locally and settle
    /// soon, so that the next requests do not wait.
    Low,
    /// No room left (or the key is not known yet): wait for a settlement.
    Settle,
}

/// One node's view of the fleet's counters.
#[derive(Debug)]
pub struct Fleet {
    batch: u64,
    rates: Rates,
    global: Option<Bucket>,
    global_pending: i64,
    global_sent: i64,
    keys: HashMap<Arc<str>, KeyView>,
    /// The keys marked for the next settlement, each once.
    queue: Vec<Arc<str>>,
    seq: u64,
    unacked: Option<Settlement>,
    sweep_at: usize,
}

impl Fleet {
    /// An empty view; `batch` caps the room under any limit. `first_seq`
    /// must be above any number this node's identity used before (a
    /// process's start time in ms does).
    pub fn new(batch: u64, first_seq: u64) -> Fleet {
        Fleet {
            batch: batch.max(1),
            rates: Rates::default(),
            global: None,
            global_pending: 0,
            global_sent: 0,
            keys: HashMap::new(),
            queue: Vec::new(),
            seq: first_seq,
            unacked: None,
            sweep_at: SWEEP_AT,
        }
    }

    fn key_room(&self, limits: &LimitsConfig) -> u64 {
        [limits.key_rpm, limits.key_concurrency, limits.key_tpm]
            .into_iter()
            .filter(|l| *l > 0)
            .map(|l| room(l, self.batch))
            .min()
            .unwrap_or(self.batch)
    }

    fn view(&mut self, key: &str, now_ms: f64) -> &mut KeyView {
        if !self.keys.contains_key(key) {
            let key: Arc<str> = Arc::from(key);
            self.queue.push(Arc::clone(&key));
            self.keys.insert(
                Arc::clone(&key),
                KeyView {
                    key,
                    dirty: true,
                    touched_ms: now_ms,
                    ..KeyView::default()
                },
            );
        }
        let v = self.keys.get_mut(key).expect("inserted above");
        v.touched_ms = now_ms;
        v
    }

    /// May a request of `key` be decided on the view now?
    pub fn room(&mut self, limits: &LimitsConfig, key: Option<&str>, now_ms: f64) -> Room {
        self.rates = Rates::of(limits);
        let fill = |unseen: i64, room: u64| {
            let room = room as i64;
            if unseen >= room {
                Room::Settle
            } else if 2 * unseen >= room {
                Room::Low
            } else {
                Room::Free
            }
        };
        let global = if limits.global_rpm > 0 {
            fill(
                self.global_pending + self.global_sent,
                room(limits.global_rpm, self.batch),
            )
        } else {
            Room::Free
        };
        let Some(k) = key else { return global };
        let key_room = self.key_room(limits);
        let v = self.view(k, now_ms);
        let stale = now_ms - v.settled_ms > REFRESH_MS;
        let key = if v.known {
            fill(v.unseen(), key_room)
        } else {
            Room::Settle
        };
        if let Some(k) = stale.then(|| v.mark()).flatten() {
            self.queue.push(k);
        }
        global.max(key)
    }

    /// Has a settlement answered for `key` yet? (Asking makes sure the
    /// next one carries it.)
    pub fn knows(&mut self, key: &str, now_ms: f64) -> bool {
        self.view(key, now_ms).known
    }

    /// [`limits::acquire`] on the view. The host checks [`Fleet::room`]
    /// first (unless the store is down and it fails open).
    pub fn acquire(&mut self, limits: &LimitsConfig, key: Option<&str>, force: bool, now_ms: f64) -> Verdict {
        self.rates = Rates::of(limits);
        let mut global = self.global;
        let v = match key {
            Some(k) => {
                let view = self.view(k, now_ms);
                let mut c = Counters {
                    global,
                    rpm: view.rpm,
                    tpm: view.tpm,
                    in_flight: view.in_flight + view.others,
                };
                let v = limits::acquire(limits, &mut c, true, now_ms, force);
                view.rpm = c.rpm;
                view.tpm = c.tpm;
                if v.took {
                    view.in_flight += 1;
                    view.pending.taken += 1;
                }
                // Taken: the slot count changed. Refused: the next
                // settlement brings the fleet's counters sooner.
                if let Some(k) = view.mark() {
                    self.queue.push(k);
                }
                global = c.global;
                v
            }
            None => {
                let mut c = Counters {
                    global,
                    ..Counters::default()
                };
                let v = limits::acquire(limits, &mut c, false, now_ms, force);
                global = c.global;
                v
            }
        };
        self.global = global;
        if v.took {
            self.global_pending += 1;
        }
        v
    }

    /// Give back what [`Fleet::acquire`] took.
    pub fn refund(&mut self, limits: &LimitsConfig, key: Option<&str>, now_ms: f64) {
        let mut c = Counters {
            global: self.global,
            ..Counters::default()
        };
        if let Some(k) = key {
            let view = self.view(k, now_ms);
            c.rpm = view.rpm;
            c.in_flight = view.in_flight;
            limits::refund(limits, &mut c, true);
            view.rpm = c.rpm;
            view.in_flight = c.in_flight;
            view.pending.taken -= 1;
            if let Some(k) = view.mark() {
                self.queue.push(k);
            }
        } else {
            limits::refund(limits, &mut c, false);
        }
        self.global = c.global;
        self.global_pending -= 1;
    }

    /// A request of `key` ended: free its slot.
    pub fn release(&mut self, key: &str) {
        if let Some(v) = self.keys.get_mut(key) {
            v.in_flight = v.in_flight.saturating_sub(1);
            if let Some(k) = v.mark() {
                self.queue.push(k);
            }
        }
    }

    /// Charge a finished request: `tokens` to the key's token bucket,
    /// `billable` to its quota.
    pub fn charge(
        &mut self,
        limits: &LimitsConfig,
        key: &str,
        tokens: u64,
        billable: u64,
        answered_ms: i64,
        now_ms: f64,
    ) {
        let view = self.view(key, now_ms);
        if limits.key_tpm > 0 && tokens > 0 {
            limits::charge(limits, &mut view.tpm, tokens, now_ms);
            view.pending.tokens = view.pending.tokens.saturating_add(tokens);
        }
        if billable > 0 {
            view.pending.billable = view.pending.billable.saturating_add(billable);
            view.pending.last_answered_ms = view.pending.last_answered_ms.max(answered_ms);
        }
        if view.pending.is_empty() {
            return;
        }
        if let Some(k) = view.mark() {
            self.queue.push(k);
        }
    }

    /// The key's quota usage as this node knows it: the fleet's at the last
    /// settlement plus this node's charges since.
    pub fn used(&self, key: &str) -> u64 {
        self.keys.get(key).map_or(0, |v| {
            v.used
                .saturating_add(v.sent.billable)
                .saturating_add(v.pending.billable)
        })
    }

    /// Is anything waiting to be settled?
    pub fn has_work(&self) -> bool {
        self.unacked.is_some() || self.global_pending != 0 || !self.queue.is_empty()
    }

    /// The settlement to send now: the last one again if it was not
    /// answered, else a new one of what is pending (`None`: nothing).
    pub fn settlement(&mut self) -> Option<Settlement> {
        if let Some(s) = &self.unacked {
            return Some(s.clone());
        }
        let mut keys = Vec::new();
        while keys.len() < MAX_KEYS_PER_SETTLEMENT {
            let Some(k) = self.queue.pop() else { break };
            let Some(v) = self.keys.get_mut(&k) else {
                continue;
            };
            let delta = std::mem::take(&mut v.pending);
            v.sent.add(&delta);
            v.dirty = false;
            keys.push(KeySettlement {
                key: k,
                delta,
                in_flight: v.in_flight,
            });
        }
        if keys.is_empty() && self.global_pending == 0 {
            return None;
        }
        self.seq += 1;
        let s = Settlement {
            seq: self.seq,
            rates: self.rates,
            global_taken: std::mem::take(&mut self.global_pending),
            keys,
        };
        self.global_sent += s.global_taken;
        self.unacked = Some(s.clone());
        Some(s)
    }

    /// The store answered settlement `seq`: its levels, less what this
    /// node took since it was cut, become the view.
    pub fn settled(&mut self, seq: u64, reply: &SettleReply, now_ms: f64) {
        let Some(s) = self.unacked.take_if(|s| s.seq == seq) else {
            return;
        };
        self.global_sent = 0;
        if let Some(level) = reply.global {
            self.global = Some(Bucket {
                tokens: level - self.global_pending as f64,
                at_ms: now_ms,
                limit: s.rates.global_rpm,
            });
        }
        for (ks, levels) in s.keys.iter().zip(&reply.keys) {
            let Some(v) = self.keys.get_mut(&ks.key) else {
                continue;
            };
            v.sent = Delta::default();
            v.known = true;
            v.settled_ms = now_ms;
            v.others = levels.others_in_flight;
            v.used = levels.used;
            if let Some(level) = levels.rpm {
                v.rpm = Some(Bucket {
                    tokens: level - v.pending.taken as f64,
                    at_ms: now_ms,
                    limit: s.rates.key_rpm,
                });
            }
            if let Some(level) = levels.tpm {
                v.tpm = Some(Bucket {
                    tokens: level - v.pending.tokens as f64,
                    at_ms: now_ms,
                    limit: s.rates.key_tpm,
                });
            }
        }
        if self.keys.len() >= self.sweep_at {
            self.keys.retain(|_, v| !v.idle(now_ms));
            self.sweep_at = (self.keys.len() * 2).max(SWEEP_AT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(key_rpm: u64) -> LimitsConfig {
        LimitsConfig {
            key_rpm,
            ..LimitsConfig::default()
        }
    }

    /// A store that applies settlements as the Redis script does (once per
    /// number), with no refill (every step at t=0).
    #[derive(Default)]
    struct Store {
        rpm: HashMap<String, f64>,
        used: HashMap<String, u64>,
        slots: HashMap<(String, usize), u64>,
        applied: HashMap<usize, u64>,
    }

    impl Store {
        fn settle(&mut self, node: usize, s: &Settlement) -> SettleReply {
            let apply = self.applied.get(&node).is_none_or(|last| s.seq > *last);
            if apply {
                self.applied.insert(node, s.seq);
            }
            let mut reply = SettleReply::default();
            for k in &s.keys {
                let key = k.key.to_string();
                let rpm = self.rpm.entry(key.clone()).or_insert(s.rates.key_rpm as f64);
                let used = self.used.entry(key.clone()).or_default();
                if apply {
                    *rpm -= k.delta.taken as f64;
                    *used += k.delta.billable;
                }
                self.slots.insert((key.clone(), node), k.in_flight);
                let others = self
                    .slots
                    .iter()
                    .filter(|((kk, n), _)| *kk == key && *n != node)
                    .map(|(_, c)| *c)
                    .sum();
                reply.keys.push(KeyLevels {
                    rpm: Some(*rpm),
                    tpm: None,
                    others_in_flight: others,
                    used: *used,
                });
            }
            reply
        }
    }

    fn admit(f: &mut Fleet, l: &LimitsConfig, key: &str) -> Option<bool> {
        match f.room(l, Some(key), 0.0) {
            Room::Settle => None,
            Room::Free | Room::Low => Some(f.acquire(l, Some(key), false, 0.0).denial.is_none()),
        }
    }

    /// The node's first request of "k" waits for a settlement: run it.
    fn meet(f: &mut Fleet, l: &LimitsConfig, store: &mut Store, node: usize) {
        assert_eq!(admit(f, l, "k"), None);
        settle(f, store, node);
    }

    fn settle(f: &mut Fleet, store: &mut Store, node: usize) {
        if let Some(s) = f.settlement() {
            let r = store.settle(node, &s);
            f.settled(s.seq, &r, 0.0);
        }
    }

    #[test]
    fn room_is_a_share_of_the_limit_within_the_batch() {
        assert_eq!(room(60, 50), 1);
        assert_eq!(room(1_000, 50), 10);
        assert_eq!(room(1_000_000, 50), 50);
        assert_eq!(room(5, 0), 1);
    }

    #[test]
    fn an_unknown_key_waits_for_one_settlement_then_admits_locally() {
        let l = lim(1_000);
        let mut f = Fleet::new(50, 0);
        let mut store = Store::default();
        assert_eq!(admit(&mut f, &l, "k"), None);
        settle(&mut f, &mut store, 0);
        // Room under 1,000 rpm: 10 unseen requests; from the fifth on the
        // host is told to settle soon.
        for i in 0..10 {
            let want = if i < 5 { Room::Free } else { Room::Low };
            assert_eq!(f.room(&l, Some("k"), 0.0), want, "request {i}");
            assert_eq!(admit(&mut f, &l, "k"), Some(true));
        }
        assert_eq!(admit(&mut f, &l, "k"), None);
        settle(&mut f, &mut store, 0);
        assert_eq!(store.rpm["k"], 990.0);
        assert_eq!(admit(&mut f, &l, "k"), Some(true));
    }

    /// Three nodes race for one key of 300 rpm (room 3): together they
    /// admit at most 300 + 3 x 3 before the fleet refuses.
    #[test]
    fn a_fleet_overshoots_by_at_most_nodes_times_room() {
        let l = lim(300);
        let mut nodes: Vec<Fleet> = (0..3).map(|_| Fleet::new(50, 0)).collect();
        let mut store = Store::default();
        let mut admitted = 0;
        for _round in 0..200 {
            for (i, f) in nodes.iter_mut().enumerate() {
                loop {
                    match admit(f, &l, "k") {
                        Some(true) => admitted += 1,
                        Some(false) => break,
                        None => {
                            settle(f, &mut store, i);
                            break;
                        }
                    }
                }
            }
        }
        assert!((300..=309).contains(&admitted), "admitted {admitted}");
    }

    #[test]
    fn a_lost_answer_is_sent_again_and_applied_once() {
        let l = lim(1_000);
        let mut f = Fleet::new(50, 0);
        let mut store = Store::default();
        meet(&mut f, &l, &mut store, 0);
        for _ in 0..4 {
            assert_eq!(admit(&mut f, &l, "k"), Some(true));
        }
        f.charge(&l, "k", 0, 7, 1, 0.0);
        // The store applies it but the answer is lost.
        let s = f.settlement().expect("deltas");
        store.settle(0, &s);
        assert_eq!(f.used("k"), 7);
        // More happens meanwhile; the next call sends the same settlement.
        assert_eq!(admit(&mut f, &l, "k"), Some(true));
        let again = f.settlement().expect("resent");
        assert_eq!(again, s);
        let r = store.settle(0, &again);
        f.settled(again.seq, &r, 0.0);
        assert_eq!((store.rpm["k"], store.used["k"]), (996.0, 7));
        // Then the request taken meanwhile.
        settle(&mut f, &mut store, 0);
        assert_eq!(store.rpm["k"], 995.0);
        assert_eq!(f.used("k"), 7);
    }

    #[test]
    fn slots_are_absolute_and_other_nodes_count() {
        let l = LimitsConfig {
            key_concurrency: 3,
            ..LimitsConfig::default()
        };
        let (mut a, mut b) = (Fleet::new(50, 0), Fleet::new(50, 0));
        let mut store = Store::default();
        meet(&mut a, &l, &mut store, 0);
        meet(&mut b, &l, &mut store, 1);
        assert_eq!(admit(&mut a, &l, "k"), Some(true));
        settle(&mut a, &mut store, 0);
        assert_eq!(admit(&mut a, &l, "k"), Some(true));
        settle(&mut a, &mut store, 0);
        settle(&mut b, &mut store, 1);
        // Two in flight on a: b has room for one.
        assert_eq!(admit(&mut b, &l, "k"), Some(true));
        settle(&mut b, &mut store, 1);
        assert_eq!(admit(&mut b, &l, "k"), Some(false));
        a.release("k");
        settle(&mut a, &mut store, 0);
        settle(&mut b, &mut store, 1);
        assert_eq!(admit(&mut b, &l, "k"), Some(true));
        assert_eq!(store.slots[&("k".to_owned(), 0)], 1);
    }

    #[test]
    fn the_view_keeps_what_was_taken_while_a_settlement_was_out() {
        let l = lim(1_000);
        let mut f = Fleet::new(50, 0);
        let mut store = Store::default();
        meet(&mut f, &l, &mut store, 0);
        admit(&mut f, &l, "k");
        let s = f.settlement().expect("one taken");
        admit(&mut f, &l, "k");
        admit(&mut f, &l, "k");
        let r = store.settle(0, &s);
        f.settled(s.seq, &r, 0.0);
        // The store has 999; two more were taken here since the cut.
        let v = &f.keys["k"];
        assert_eq!(v.rpm.map(|b| b.tokens), Some(997.0));
        assert_eq!(v.unseen(), 2);
    }

    #[test]
    fn a_settlement_carries_only_marked_keys_and_at_most_its_share() {
        let l = lim(1_000);
        let mut f = Fleet::new(50, 0);
        let mut store = Store::default();
        for i in 0..300 {
            assert_eq!(f.room(&l, Some(&format!("k{i}")), 0.0), Room::Settle);
        }
        let first = f.settlement().expect("new keys");
        assert_eq!(first.keys.len(), MAX_KEYS_PER_SETTLEMENT);
        let r = store.settle(0, &first);
        f.settled(first.seq, &r, 0.0);
        let second = f.settlement().expect("the rest");
        assert_eq!(second.keys.len(), 300 - MAX_KEYS_PER_SETTLEMENT);
        let r = store.settle(0, &second);
        f.settled(second.seq, &r, 0.0);
        // Nothing changed since: nothing to send.
        assert!(!f.has_work());
        assert!(f.settlement().is_none());
        // One key's request marks that key alone.
        f.release("k7");
        let s = f.settlement().expect("one key");
        assert_eq!(s.keys.iter().map(|k| &*k.key).collect::<Vec<_>>(), ["k7"]);
    }

    #[test]
    fn refunds_and_quota_charges_are_deltas_too() {
        let l = lim(1_000);
        let mut f = Fleet::new(50, 0);
        let mut store = Store::default();
        meet(&mut f, &l, &mut store, 0);
        admit(&mut f, &l, "k");
        admit(&mut f, &l, "k");
        f.refund(&l, Some("k"), 0.0);
        f.release("k");
        f.charge(&l, "k", 0, 30, 5, 0.0);
        assert_eq!(f.used("k"), 30);
        settle(&mut f, &mut store, 0);
        assert_eq!((store.rpm["k"], store.used["k"]), (999.0, 30));
        assert_eq!(store.slots[&("k".to_owned(), 0)], 0);
        assert!(!f.has_work());
    }
}
