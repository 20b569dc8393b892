//! `math.random` and `math.randomseed` with per-call state.
//!
//! LuaJIT keeps one generator per Lua state, so a `math.randomseed(42)` in one
//! call fixed the sequence every later call on that VM drew from (other
//! hooks, other requests, other tenants), and a script could read back the
//! state another call had advanced. Here the generator lives in the call's
//! [`CallContext`](super::context::CallContext), which every call replaces:
//! a call starts from a fresh, unpredictable seed, `math.randomseed` only
//! affects the rest of its own call, and nothing carries over.
//!
//! The arguments and results follow Lua 5.1: `random()` is a float in
//! `[0, 1)`, `random(m)` an integer in `[1, m]`, `random(m, n)` an integer in
//! `[m, n]`; arguments are floored.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use mlua::{Lua, Table, Variadic};

use super::context::context;

/// A small, fast generator (xoshiro256**), seeded through SplitMix64.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    s: [u64; 4],
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator whose whole sequence follows from `seed`.
    pub fn from_seed(seed: u64) -> Rng {
        let mut x = seed;
        Rng {
            s: [
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
            ],
        }
    }

    /// A generator no script can predict: a per-process random key hashed
    /// with a counter, so no two calls share a sequence.
    pub fn fresh() -> Rng {
        static KEY: OnceLock<RandomState> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = KEY.get_or_init(RandomState::new).build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        Rng::from_seed(h.finish())
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A float in `[0, 1)` with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

fn with_rng<R>(lua: &Lua, f: impl FnOnce(&mut Rng) -> R) -> R {
    match context(lua) {
        Some(ctx) => f(ctx.borrow_mut().rng.get_or_insert_with(Rng::fresh)),
        // Only between calls (never while a script runs).
        None => f(&mut Rng::fresh()),
    }
}

/// `math.random([m [, n]])`.
fn random(lua: &Lua, args: Variadic<f64>) -> mlua::Result<f64> {
    let r = with_rng(lua, Rng::next_f64);
    let (lo, hi) = match args.as_slice() {
        [] => return Ok(r),
        [m] => (1.0, m.floor()),
        [m, n] => (m.floor(), n.floor()),
        _ => return Err(mlua::Error::runtime("wrong number of arguments to 'random'")),
    };
    if lo.is_nan() || hi.is_nan() || lo > hi {
        return Err(mlua::Error::runtime("bad argument to 'random' (interval is empty)"));
    }
    Ok((r * (hi - lo + 1.0)).floor() + lo)
}

/// `math.randomseed(x)`: seeds the rest of this call only.
fn randomseed(lua: &Lua, seed: f64) -> mlua::Result<()> {
    if let Some(ctx) = context(lua) {
        ctx.borrow_mut().rng = Some(Rng::from_seed(seed.to_bits()));
    }
    Ok(())
}

/// Replace `random` and `randomseed` in `math` (the sandbox's own copy of
/// the library table).
pub(crate) fn install(lua: &Lua, math: &Table) -> mlua::Result<()> {
    math.raw_set("random", lua.create_function(random)?)?;
    math.raw_set("randomseed", lua.create_function(randomseed)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_floats_in_range() {
        let mut a = Rng::from_seed(42);
        let mut b = Rng::from_seed(42);
        for _ in 0..1000 {
            let x = a.next_f64();
            assert_eq!(x, b.next_f64());
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn fresh_generators_differ() {
        assert_ne!(Rng::fresh().next_u64(), Rng::fresh().next_u64());
    }
}
