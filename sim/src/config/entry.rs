//! Compared entries: a strategy name with an optional `@policy` and `+`-separated modifiers
//! (`sim compare --strategies hetlora+agg=median,fedspine@ucb1+scope=class`), each turned into
//! the experiment config it runs.

use super::ExperimentConfig;
use crate::error::SimError;

impl ExperimentConfig {
    /// Switch to a compared entry: a strategy name, optionally with `@policy` (a policy kind
    /// such as `uniform-random` or `fixed`, with its default parameters) replacing
    /// `coordinator.policy`, then any `+`-separated modifiers: `agg=METHOD` (the aggregation
    /// method, for the strategy's own `aggregation` override too), `clip=NORM`
    /// (`aggregation.clip_norm`), `screen=K` (`aggregation.screen_factor`), `scope=device|class` (`coordinator.bandit_scope`),
    /// `explore=N` (`coordinator.explore_per_round`), `bounded`
    /// (`coordinator.bounded_exploration`), `over=X` (`coordinator.over_selection`: select
    /// `ceil(n (1 + X))` devices, close the round on the first n updates), `w1=X` ... `w4=X`
    /// (`coordinator.reward`'s
    /// term weights), `loss-trim=X` (`coordinator.reward.loss_trim`: the share of a round's
    /// devices whose loss changes cannot set the reward's loss scale), `clean` (no Byzantine devices), and the devices' pruning: `k=N`
    /// (`coordinator.prune_interval_steps`, the longest interval between pruning events),
    /// `events=N` (`pruning.min_events`, the schedule's floor on events per round), `crit=NAME`
    /// (`pruning.criterion`) and `per-block` (`pruning.per_block`). E.g.
    /// `hetlora+agg=median`, `hetlora+agg=median+clean`, `fixed-prune+crit=taylor+per-block`.
    pub fn with_entry(&self, entry: &str) -> Result<Self, SimError> {
        let mut parts = entry.split('+');
        let head = parts.next().unwrap_or_default();
        let (strategy, policy) = match head.split_once('@') {
            Some((s, p)) => (s.trim(), Some(p.trim())),
            None => (head.trim(), None),
        };
        let mut base = self.clone();
        let mut clip = None;
        let mut screen = None;
        let mut clean = false;
        for m in parts {
            let m = m.trim();
            match m.split_once('=') {
                Some(("agg", method)) => {
                    let value = toml::Value::String(method.to_string());
                    base.coordinator.aggregation.method =
                        value.clone().try_into().map_err(|e| {
                            SimError::Config(format!(
                                "entry '{entry}': unknown aggregation method '{method}' ({e})"
                            ))
                        })?;
                    if matches!(strategy, "hetlora" | "fedlora") {
                        base.strategies
                            .entry(strategy.to_string())
                            .or_default()
                            .insert("aggregation".into(), value);
                    }
                }
                Some(("clip", norm)) => match norm.parse::<f64>() {
                    Ok(x) if x.is_finite() && x > 0.0 => clip = Some(x),
                    _ => {
                        return Err(SimError::Config(format!(
                            "entry '{entry}': clip={norm} is not a positive norm"
                        )))
                    }
                },
                Some(("screen", k)) => match k.parse::<f64>() {
                    Ok(x) if x.is_finite() && x > 1.0 => screen = Some(x),
                    _ => {
                        return Err(SimError::Config(format!(
                            "entry '{entry}': screen={k} is not a factor above 1"
                        )))
                    }
                },
                Some(("scope", scope)) => {
                    base.coordinator.bandit_scope = toml::Value::String(scope.to_string())
                        .try_into()
                        .map_err(|_| {
                            SimError::Config(format!(
                                "entry '{entry}': scope={scope} is not device or class"
                            ))
                        })?;
                }
                Some(("explore", n)) => match n.parse::<usize>() {
                    Ok(n) => base.coordinator.explore_per_round = Some(n),
                    Err(_) => {
                        return Err(SimError::Config(format!(
                            "entry '{entry}': explore={n} is not a number of devices"
                        )))
                    }
                },
                Some(("over", x)) => match x.parse::<f64>() {
                    Ok(x) if x.is_finite() && (0.0..=10.0).contains(&x) => {
                        base.coordinator.over_selection = x
                    }
                    _ => {
                        return Err(SimError::Config(format!(
                            "entry '{entry}': over={x} is not an over-selection in [0, 10]"
                        )))
                    }
                },
                Some((w @ ("w1" | "w2" | "w3" | "w4"), x)) => {
                    let weight = x.parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0);
                    let Some(weight) = weight else {
                        return Err(SimError::Config(format!(
                            "entry '{entry}': {w}={x} is not a finite weight >= 0"
                        )));
                    };
                    let r = &mut base.coordinator.reward;
                    *match w {
                        "w1" => &mut r.w1,
                        "w2" => &mut r.w2,
                        "w3" => &mut r.w3,
                        _ => &mut r.w4,
                    } = weight;
                }
                Some(("loss-trim", x)) => match x.parse::<f64>() {
                    Ok(x) if x.is_finite() && (0.0..0.5).contains(&x) => {
                        base.coordinator.reward.loss_trim = x
                    }
                    _ => {
                        return Err(SimError::Config(format!(
                            "entry '{entry}': loss-trim={x} is not a share in [0, 0.5)"
                        )))
                    }
                },
                Some(("k", n)) => match n.parse::<u32>() {
                    Ok(n) if n >= 1 => base.coordinator.prune_interval_steps = n,
                    _ => {
                        return Err(SimError::Config(format!(
                            "entry '{entry}': k={n} is not a number of local steps >= 1"
                        )))
                    }
                },
                Some(("events", n)) => match n.parse::<usize>() {
                    Ok(n) if n >= 1 => base.pruning.min_events = n,
                    _ => {
                        return Err(SimError::Config(format!(
                            "entry '{entry}': events={n} is not a number of pruning events >= 1"
                        )))
                    }
                },
                Some(("crit", name)) => {
                    base.pruning.criterion = name
                        .parse()
                        .map_err(|e| SimError::Config(format!("entry '{entry}': {e}")))?;
                }
                None if m == "clean" => clean = true,
                None if m == "bounded" => base.coordinator.bounded_exploration = true,
                None if m == "per-block" => base.pruning.per_block = true,
                _ => {
                    return Err(SimError::Config(format!(
                        "entry '{entry}': unknown modifier '{m}' (agg=METHOD, clip=NORM, screen=K, \
                         scope=device|class, explore=N, bounded, over=X, w1..w4=X, loss-trim=X, clean, \
                         k=N, events=N, crit=NAME, per-block)"
                    )))
                }
            }
        }
        if clip.is_some() {
            base.coordinator.aggregation.clip_norm = clip;
        }
        if screen.is_some() {
            base.coordinator.aggregation.screen_factor = screen;
        }
        if clean {
            base.byzantine.fraction = 0.0;
        }
        let mut c = base.with_strategy(strategy)?;
        if let Some(policy) = policy {
            c.coordinator.policy = policy_of_entry(entry, policy)?;
            c.validate()?;
        }
        Ok(c)
    }
}

/// The policy of a compared entry's `@KIND[:KEY=VALUE...]` part: the kind with its
/// defaults, each `KEY=VALUE` (a TOML value: a number, `true`, a quoted string) replacing one
/// of its parameters, e.g. `s-ucb:nu=0.1:exploration=0.3` or `fixed:prune_ratio=0.6:rank=4`.
fn policy_of_entry(entry: &str, policy: &str) -> Result<bandit::PolicyConfig, SimError> {
    let mut parts = policy.split(':');
    let kind = parts.next().unwrap_or_default().trim();
    let mut t = toml::Table::new();
    t.insert("kind".into(), toml::Value::String(kind.to_string()));
    for kv in parts {
        let Some((key, value)) = kv.split_once('=') else {
            return Err(SimError::Config(format!(
                "entry '{entry}': policy parameter '{kv}' is not KEY=VALUE"
            )));
        };
        let key = key.trim();
        let parsed: toml::Table =
            toml::from_str(&format!("v = {}", value.trim())).map_err(|_| {
                SimError::Config(format!(
                    "entry '{entry}': policy parameter {key}={value} is not a TOML value"
                ))
            })?;
        let v = parsed.get("v").cloned().ok_or_else(|| {
            SimError::Config(format!(
                "entry '{entry}': policy parameter {key} has no value"
            ))
        })?;
        if t.insert(key.to_string(), v).is_some() {
            return Err(SimError::Config(format!(
                "entry '{entry}': policy parameter '{key}' given twice"
            )));
        }
    }
    toml::Value::Table(t)
        .try_into()
        .map_err(|e| SimError::Config(format!("entry '{entry}': policy '{policy}' ({e})")))
}

#[cfg(test)]
mod tests {
    use super::super::{Mode, PruningConfig};
    use super::*;
    use device_agent::prune::Criterion;

    /// `@KIND:KEY=VALUE...` sets the policy's parameters; a parameter the policy does not
    /// have, a value that is not TOML, a repeated key, a pair without `=` or a fixed arm outside
    /// the arm space is refused by name.
    #[test]
    fn an_entry_sets_its_policy_parameters() {
        let b = ExperimentConfig::preset("bandit").unwrap();
        let c = b
            .with_entry("fedspine@fixed:prune_ratio=0.4:rank=4")
            .unwrap();
        assert_eq!(
            c.coordinator.policy,
            bandit::PolicyConfig::Fixed(bandit::policy::FixedConfig {
                prune_ratio: Some(0.4),
                rank: Some(4),
            })
        );
        let c = b.with_entry("fedspine+scope=class").unwrap();
        assert_eq!(
            c.coordinator.bandit_scope,
            aggregator::coordinator::BanditScope::Class
        );
        let c = b
            .with_entry("fedspine@ucb1+scope=class+explore=2+bounded+w4=3")
            .unwrap();
        assert_eq!(c.coordinator.explore_per_round, Some(2));
        assert!(c.coordinator.bounded_exploration);
        assert_eq!(c.coordinator.reward.w4, 3.0);
        assert_eq!(c.coordinator.reward.w1, b.coordinator.reward.w1);
        let c = b.with_entry("fedspine+over=0.25").unwrap();
        assert_eq!(c.coordinator.over_selection, 0.25);
        for bad in ["over=-0.1", "over=NaN", "over=11"] {
            let e = b.with_entry(&format!("fedspine+{bad}")).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        let e = b.with_entry("fedspine+w2=-1").unwrap_err().to_string();
        assert!(e.contains("w2=-1"), "{e}");
        let e = b.with_entry("fedspine+explore=-1").unwrap_err().to_string();
        assert!(e.contains("explore=-1"), "{e}");
        let e = b
            .with_entry("fedspine+scope=fleet")
            .unwrap_err()
            .to_string();
        assert!(e.contains("scope=fleet"), "{e}");
        let c = b.with_entry("fedspine@s-ucb:nu=0.1+clean").unwrap();
        match c.coordinator.policy {
            bandit::PolicyConfig::SUcb(s) => {
                assert_eq!(s.nu, 0.1);
                assert_eq!(s.rho, bandit::policy::SUcbConfig::default().rho);
            }
            other => panic!("{other:?}"),
        }
        for (entry, says) in [
            ("fedspine@s-ucb:speed=2", "speed"),
            ("fedspine@s-ucb:nu=fast", "nu=fast"),
            ("fedspine@s-ucb:nu=0.1:nu=0.2", "'nu' given twice"),
            ("fedspine@s-ucb:nu", "'nu' is not KEY=VALUE"),
            // The preset's arm space is [0, 0.5] x {4, 8, 16}: the arm is checked against it.
            ("fedspine@fixed:prune_ratio=0.6", "outside [0, 0.5]"),
        ] {
            let e = b.with_entry(entry).unwrap_err().to_string();
            assert!(e.contains(says), "{entry}: {e}");
        }
    }

    /// `k=N`, `events=N`, `crit=NAME` and `per-block` set the devices' pruning (a file's `[pruning]` table
    /// the same); a bad value is refused by name; the surrogate refuses a criterion or block
    /// ratio it was not fitted on.
    #[test]
    fn an_entry_sets_the_rewards_loss_trim() {
        let b = ExperimentConfig::preset("bandit").unwrap();
        assert_eq!(b.coordinator.reward.loss_trim, 0.0);
        let c = b.with_entry("fedspine+loss-trim=0.2+w4=3").unwrap();
        assert_eq!(
            (c.coordinator.reward.loss_trim, c.coordinator.reward.w4),
            (0.2, 3.0)
        );
        for bad in ["0.5", "-0.1", "nan", "x"] {
            let entry = format!("fedspine+loss-trim={bad}");
            let e = b.with_entry(&entry).unwrap_err().to_string();
            assert!(e.contains(&format!("loss-trim={bad}")), "{entry}: {e}");
        }
    }

    #[test]
    fn an_entry_sets_the_devices_pruning() {
        let b = ExperimentConfig::preset("sotu").unwrap();
        assert!(b.pruning.is_default());
        let c = b
            .with_entry("fixed-prune+k=2+crit=taylor+per-block")
            .unwrap();
        assert_eq!(c.coordinator.prune_interval_steps, 2);
        assert_eq!(
            c.pruning,
            PruningConfig {
                criterion: Criterion::Taylor,
                per_block: true,
                ..PruningConfig::default()
            }
        );
        assert_eq!(c.coordinator.strategy.name(), "fixed-prune");
        let c = b.with_entry("fixed-prune+crit=magnitude").unwrap();
        assert_eq!(
            c.coordinator.prune_interval_steps,
            b.coordinator.prune_interval_steps
        );
        assert_eq!(c.pruning.criterion, Criterion::Magnitude);
        assert!(!c.pruning.per_block);
        assert_eq!(c.pruning.min_events, 8, "the agent's default floor");
        let c = b.with_entry("fixed-prune+k=20+events=1").unwrap();
        assert_eq!(
            (c.coordinator.prune_interval_steps, c.pruning.min_events),
            (20, 1)
        );
        for (entry, says) in [
            ("fixed-prune+k=0", "k=0"),
            ("fixed-prune+k=-3", "k=-3"),
            ("fixed-prune+events=0", "events=0"),
            ("fixed-prune+crit=l1", "unknown criterion 'l1'"),
        ] {
            let e = b.with_entry(entry).unwrap_err().to_string();
            assert!(e.contains(says), "{entry}: {e}");
        }
        let mut s = b.clone();
        s.mode = Mode::Surrogate;
        assert_eq!(
            s.with_entry("fixed-prune+k=2")
                .unwrap()
                .coordinator
                .prune_interval_steps,
            2
        );
        for entry in [
            "fixed-prune+crit=random",
            "fixed-prune+per-block",
            "fixed-prune+events=1",
        ] {
            let e = s.with_entry(entry).unwrap_err().to_string();
            assert!(e.contains("run this in real mode"), "{entry}: {e}");
        }
        let f = ExperimentConfig::from_toml(
            "[pruning]\ncriterion = \"random\"\nper_block = true\nmin_events = 1\n",
            "file",
        )
        .unwrap();
        assert_eq!(
            f.pruning,
            PruningConfig {
                criterion: Criterion::Random,
                per_block: true,
                min_events: 1
            }
        );
        let ablation = ExperimentConfig::from_toml(
            include_str!("../../configs/examples/ablation-sotu.toml"),
            "ablation-sotu",
        )
        .unwrap();
        for (entry, k, events, criterion) in [
            ("fixed-prune", 5, 8, Criterion::LoraGradient),
            ("fixed-prune+k=20+events=1", 20, 1, Criterion::LoraGradient),
            ("fixed-prune+crit=random", 5, 8, Criterion::Random),
        ] {
            let c = ablation.with_entry(entry).unwrap();
            assert_eq!(
                (
                    c.coordinator.prune_interval_steps,
                    c.pruning.min_events,
                    c.pruning.criterion
                ),
                (k, events, criterion),
                "{entry}"
            );
        }
        let e = ExperimentConfig::from_toml("[pruning]\ncriterion = \"l1\"\n", "file")
            .unwrap_err()
            .to_string();
        assert!(e.contains("l1"), "{e}");
    }
}
