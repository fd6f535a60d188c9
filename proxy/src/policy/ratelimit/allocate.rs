//! How a global limit is split between the sidecars that enforce it.
//!
//! Every sidecar runs this same function on the same demand table (read from etcd), so they all
//! compute the same shares and the shares sum to the limit, without talking to each other.
//! It must therefore be deterministic: participants in a fixed order, plain IEEE arithmetic.
//!
//! The split is max-min fair (water-filling): each participant wants its demand plus a little
//! headroom (so a growing demand can show), and at least a small floor (so an idle sidecar can
//! admit its first requests before its demand is published); participants that want less than
//! an equal split get what they want, the rest share what is left equally; capacity nobody
//! wants is spread equally over everyone.

/// A participant wants this much more than its measured demand.
/// Kept small: demand counts refused attempts too, so growth shows without headroom; what
/// headroom an unsaturated sidecar does not use is capacity nobody else gets (see
/// `docs/ratelimit.md`, error bounds).
pub const HEADROOM: f64 = 1.02;
/// All idle participants together keep at least this fraction of the limit.
pub const FLOOR_FRACTION: f64 = 0.02;

/// Shares of `limit` for participants with the given demands (requests per second), in the
/// same order. Sums to `limit` (up to rounding) whenever `demands` is not empty.
pub fn allocate(limit: f64, demands: &[f64]) -> Vec<f64> {
    let n = demands.len();
    if n == 0 {
        return Vec::new();
    }
    let floor = limit * FLOOR_FRACTION / n as f64;
    let wants: Vec<f64> = demands
        .iter()
        .map(|d| (d.max(0.0) * HEADROOM).max(floor))
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    // Ties broken by position, so the order (and the arithmetic) is the same everywhere.
    order.sort_by(|&a, &b| wants[a].total_cmp(&wants[b]).then(a.cmp(&b)));
    let mut shares = vec![0.0; n];
    let mut left = limit;
    for (k, &i) in order.iter().enumerate() {
        let fair = left / (n - k) as f64;
        let give = wants[i].min(fair);
        shares[i] = give;
        left -= give;
    }
    if left > 0.0 {
        let extra = left / n as f64;
        for s in &mut shares {
            *s += extra;
        }
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn oversubscribed_demand_is_split_max_min_fair() {
        // 60/30/10 % of twice the limit.
        let s = allocate(100.0, &[120.0, 60.0, 20.0]);
        assert!(close(s[2], 20.4), "{s:?}");
        assert!(close(s[0], 39.8) && close(s[1], 39.8), "{s:?}");
        assert!(close(s.iter().sum(), 100.0));
    }

    #[test]
    fn spare_capacity_goes_to_everyone_equally() {
        let s = allocate(100.0, &[10.0, 0.0, 30.0]);
        let floor = 100.0 * FLOOR_FRACTION / 3.0;
        let left = 100.0 - 10.2 - floor - 30.6;
        assert!(close(s[0], 10.2 + left / 3.0), "{s:?}");
        assert!(close(s[1], floor + left / 3.0), "{s:?}");
        assert!(close(s.iter().sum(), 100.0));
    }

    #[test]
    fn one_busy_participant_gets_all_but_the_floors() {
        let s = allocate(100.0, &[0.0, 500.0, 0.0, 0.0]);
        assert!(close(s[1], 98.5), "{s:?}");
        assert!(close(s[0], 0.5));
    }

    #[test]
    fn same_input_same_output_and_always_sums_to_the_limit() {
        let mut seed = 7u64;
        for _ in 0..1000 {
            let n = (seed % 12 + 1) as usize;
            let demands: Vec<f64> = (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 40) as f64 / 1000.0
                })
                .collect();
            let a = allocate(250.0, &demands);
            assert_eq!(a, allocate(250.0, &demands));
            assert!(
                (a.iter().sum::<f64>() - 250.0).abs() < 1e-6,
                "{demands:?} {a:?}"
            );
            assert!(a.iter().all(|s| *s > 0.0));
        }
        assert!(allocate(1.0, &[]).is_empty());
    }
}
