//! Rate limits: a token bucket (messages per user, upgrades per client address) and the
//! per-address table of open connections and upgrade attempts. Pure: the time is passed in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A token bucket holding at most `per_minute` tokens, refilled at `per_minute` a minute:
/// a whole minute's allowance may be used at once, and no more than that in any minute on
/// average.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    /// Tokens left, in [`UNIT`]s: refilling `per_minute` tokens a minute is then exactly
    /// `per_minute` units a millisecond, with nothing lost to rounding.
    units: u64,
    /// When `units` was last brought up to date (whole milliseconds after it are counted).
    at: Instant,
}

/// One token: the milliseconds of a minute.
const UNIT: u64 = 60_000;

impl Bucket {
    /// A full bucket.
    pub fn full(per_minute: u32, now: Instant) -> Bucket {
        Bucket {
            units: u64::from(per_minute) * UNIT,
            at: now,
        }
    }

    /// Takes a token if there is one; else how long until there is.
    pub fn take(&mut self, per_minute: u32, now: Instant) -> Result<(), Duration> {
        self.refill(per_minute, now);
        if self.units >= UNIT {
            self.units -= UNIT;
            return Ok(());
        }
        let missing = UNIT - self.units;
        Err(Duration::from_millis(
            missing.div_ceil(u64::from(per_minute.max(1))),
        ))
    }

    /// Whether the bucket is full again (an entry for it can be forgotten).
    pub fn is_full(&mut self, per_minute: u32, now: Instant) -> bool {
        self.refill(per_minute, now);
        self.units >= u64::from(per_minute) * UNIT
    }

    fn refill(&mut self, per_minute: u32, now: Instant) {
        let cap = u64::from(per_minute) * UNIT;
        // Capped at a minute: a full refill, whatever came before.
        let ms = now
            .saturating_duration_since(self.at)
            .as_millis()
            .min(u128::from(UNIT)) as u64;
        self.units = self
            .units
            .saturating_add(ms * u64::from(per_minute))
            .min(cap);
        self.at += Duration::from_millis(ms);
        if self.units >= cap {
            self.at = now;
        }
    }
}

/// The address a limit counts by: an IPv4 address, or the /64 of an IPv6 one (a single
/// host is given a whole /64, so counting its addresses one by one would count nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Client(u128);

impl Client {
    /// The key of `ip` (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn of(ip: IpAddr) -> Client {
        match ip {
            IpAddr::V4(v4) => Client(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client(u128::from(u32::from(v4))),
                None => Client((u128::from(v6) >> 64 << 64) | 1 << 32),
            },
        }
    }
}

/// Addresses tracked at most. An address is tracked while it has connections open or its
/// upgrade bucket is not full again; past this many, new addresses are not limited (and a
/// warning says so) rather than refused, so that many addresses cannot lock others out.
pub const MAX_TRACKED: usize = 16 * 1024;

#[derive(Debug)]
struct Entry {
    open: u32,
    upgrades: Bucket,
}

/// Per client address: open connections and upgrade attempts.
#[derive(Debug)]
pub struct PerClient {
    /// `--max-connections-per-ip` (0: no limit).
    max_open: u32,
    /// `--max-connects-per-minute-per-ip` (0: no limit).
    upgrades_per_minute: u32,
    entries: HashMap<Client, Entry>,
    /// When the table was last swept of entries it no longer needs: at most once a second,
    /// so that a full table does not cost a sweep per connection.
    swept: Option<Instant>,
}

/// Why a client was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// It has `--max-connections-per-ip` open.
    Open(u32),
    /// It spent its upgrades for now; one is allowed again after this long.
    Rate(Duration),
}

impl PerClient {
    /// A table with these limits (0: that limit is off).
    pub fn new(max_open: u32, upgrades_per_minute: u32) -> PerClient {
        PerClient {
            max_open,
            upgrades_per_minute,
            entries: HashMap::new(),
            swept: None,
        }
    }

    /// A connection from `client` was accepted: counts it, or refuses it.
    pub fn open(&mut self, client: Client, now: Instant) -> Result<(), Refused> {
        let max_open = self.max_open;
        // Off: nothing to count (the upgrade bucket makes its own entry).
        if max_open == 0 {
            return Ok(());
        }
        let Some(entry) = self.entry(client, now) else {
            return Ok(());
        };
        if entry.open >= max_open {
            return Err(Refused::Open(entry.open));
        }
        entry.open += 1;
        Ok(())
    }

    /// A connection of `client` counted by [`PerClient::open`] ended.
    pub fn close(&mut self, client: Client, now: Instant) {
        let per_minute = self.upgrades_per_minute;
        if let Some(entry) = self.entries.get_mut(&client) {
            entry.open = entry.open.saturating_sub(1);
            if entry.open == 0 && entry.upgrades.is_full(per_minute, now) {
                self.entries.remove(&client);
            }
        }
    }

    /// `client` asks for a WebSocket upgrade: takes one from its bucket, or refuses it.
    pub fn upgrade(&mut self, client: Client, now: Instant) -> Result<(), Refused> {
        let per_minute = self.upgrades_per_minute;
        if per_minute == 0 {
            return Ok(());
        }
        match self.entry(client, now) {
            Some(entry) => entry.upgrades.take(per_minute, now).map_err(Refused::Rate),
            None => Ok(()),
        }
    }

    /// Addresses tracked now.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.entries.len()
    }

    /// The entry of `client`, made if need be; `None` when the table is full even after
    /// forgetting the addresses that no longer need an entry.
    fn entry(&mut self, client: Client, now: Instant) -> Option<&mut Entry> {
        let per_minute = self.upgrades_per_minute;
        if !self.entries.contains_key(&client) && self.entries.len() >= MAX_TRACKED {
            let due = self
                .swept
                .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
            if due {
                self.swept = Some(now);
                self.entries
                    .retain(|_, e| e.open > 0 || !e.upgrades.is_full(per_minute, now));
            }
            if self.entries.len() >= MAX_TRACKED {
                return None;
            }
        }
        Some(self.entries.entry(client).or_insert_with(|| Entry {
            open: 0,
            upgrades: Bucket::full(per_minute, now),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn a_bucket_allows_a_minutes_worth_then_refills_steadily() {
        let t0 = Instant::now();
        let mut b = Bucket::full(6, t0);
        for _ in 0..6 {
            assert_eq!(b.take(6, t0), Ok(()));
        }
        // One token every 10 s.
        assert_eq!(b.take(6, t0), Err(Duration::from_secs(10)));
        assert_eq!(
            b.take(6, t0 + Duration::from_secs(6)),
            Err(Duration::from_secs(4))
        );
        assert_eq!(b.take(6, t0 + Duration::from_secs(10)), Ok(()));
        assert!(b.take(6, t0 + Duration::from_secs(10)).is_err());
        // Many small steps refill as much as one large one.
        let mut t = t0 + Duration::from_secs(10);
        for _ in 0..1000 {
            t += Duration::from_millis(7);
            let _ = b.is_full(6, t);
        }
        assert_eq!(b.take(6, t0 + Duration::from_secs(20)), Ok(()));
        assert!(!b.is_full(6, t0 + Duration::from_secs(20)));
        assert!(b.is_full(6, t0 + Duration::from_secs(80)));
    }

    #[test]
    fn addresses_are_counted_apart_and_ipv6_by_its_64() {
        let t = Instant::now();
        let mut p = PerClient::new(2, 3);
        let a = Client::of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        let b = Client::of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(p.open(a, t), Ok(()));
        assert_eq!(p.open(a, t), Ok(()));
        assert_eq!(p.open(a, t), Err(Refused::Open(2)));
        assert_eq!(p.open(b, t), Ok(()));
        p.close(a, t);
        assert_eq!(p.open(a, t), Ok(()));
        for _ in 0..3 {
            assert_eq!(p.upgrade(b, t), Ok(()));
        }
        assert_eq!(p.upgrade(b, t), Err(Refused::Rate(Duration::from_secs(20))));
        assert_eq!(p.upgrade(a, t), Ok(()));
        let v6 = |last: u16| {
            Client::of(IpAddr::V6(Ipv6Addr::new(
                0x2001, 0xdb8, 0, 1, 0, 0, 0, last,
            )))
        };
        assert_eq!(v6(1), v6(2));
        assert_ne!(
            v6(1),
            Client::of(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1)))
        );
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(Client::of(mapped), a);
    }

    #[test]
    fn the_table_forgets_what_it_no_longer_needs_and_stays_bounded() {
        let t = Instant::now();
        let mut p = PerClient::new(4, 60);
        let a = Client::of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(p.open(a, t), Ok(()));
        assert_eq!(p.upgrade(a, t), Ok(()));
        p.close(a, t);
        assert_eq!(p.tracked(), 1, "its bucket is not full yet");
        p.close(a, t + Duration::from_secs(2));
        for i in 0..(MAX_TRACKED as u32 + 10) {
            let c = Client::of(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)));
            let _ = p.upgrade(c, t + Duration::from_secs(2));
        }
        assert!(p.tracked() <= MAX_TRACKED);
        // A minute later, every bucket is full again: the table makes room.
        let c = Client::of(IpAddr::V4(Ipv4Addr::new(12, 0, 0, 1)));
        assert_eq!(p.open(c, t + Duration::from_secs(70)), Ok(()));
        assert_eq!(p.tracked(), 1);
    }
}
