//! Largest-remainder apportionment: whole counts from fractional quotas (fleet groups scaled to
//! a device count, devices shared out among SOTU groups by volume).

/// Rounds `quotas` (non-negative, summing to about `total`) to whole numbers that sum to
/// `total`: each quota's floor, then one more for the largest fractional parts (ties to the
/// earlier index).
pub fn largest_remainder(quotas: &[f64], total: usize) -> Vec<usize> {
    let mut counts: Vec<usize> = quotas.iter().map(|x| x.floor() as usize).collect();
    let mut rest: Vec<(usize, f64)> = quotas
        .iter()
        .enumerate()
        .map(|(i, x)| (i, x - x.floor()))
        .collect();
    rest.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let short = total.saturating_sub(counts.iter().sum::<usize>());
    for (i, _) in rest.into_iter().take(short) {
        counts[i] += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_to_the_total_and_favour_the_largest_remainders() {
        assert_eq!(largest_remainder(&[1.5, 1.5, 2.0], 5), vec![2, 1, 2]);
        assert_eq!(largest_remainder(&[0.2, 0.7, 2.1], 3), vec![0, 1, 2]);
        assert_eq!(largest_remainder(&[], 0), Vec::<usize>::new());
        let q: Vec<f64> = [3.0, 5.0, 2.0].iter().map(|c| c * 7.0 / 10.0).collect();
        assert_eq!(largest_remainder(&q, 7).iter().sum::<usize>(), 7);
    }
}
