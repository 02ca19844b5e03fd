//! Scenario files: a whole run described in TOML.
//!
//! ```toml
//! name = "traffic"
//! connections = 10000
//! ramp_rate = 2000            # new connections per second, all workers
//! thresholds = ["e2e_p99_ms < 50", "lost == 0"]
//!
//! [groups]                    # group sizes: P(size) ~ size^-a, mean fitted
//! min = 3
//! max = 200
//! mean = 20
//!
//! [body]                      # body sizes, the same law around the mean
//! min = 40
//! mean = 200
//! max = 2000
//!
//! [[phase]]
//! name = "idle"
//! duration = "30s"            # rate 0: heartbeats only
//!
//! [[phase]]
//! name = "traffic"
//! duration = "60s"
//! rate = 5000                 # messages per second
//! group_share = 0.2
//! read_share = 0.3            # delivered messages also marked read
//! churn_per_s = 0.01          # share of connections reconnecting per second
//! ```
//!
//! Every key is optional except a phase's `duration`; unknown keys are
//! refused with their name and line. Flags given on the command line win
//! over the file's values, except that `--rate`, `--duration`,
//! `--group-share` and `--read-share` cannot be combined with `[[phase]]`
//! tables (which would they change?).

use std::path::Path;

use serde::Deserialize;

use crate::config::{parse_duration, Args};
use crate::plan::PhasePlan;

/// A scenario file as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name (in the report).
    pub name: Option<String>,
    /// Free text; ignored.
    pub description: Option<String>,
    /// `--url`.
    pub url: Option<String>,
    /// `--connections`.
    pub connections: Option<u32>,
    /// `--ramp-rate`.
    pub ramp_rate: Option<f64>,
    /// `--workers`.
    pub workers: Option<u32>,
    /// `--threads` (per worker process).
    pub threads: Option<usize>,
    /// `--source-addrs`: a spec string or a count.
    pub source_addrs: Option<SourceAddrs>,
    /// `--seed`.
    pub seed: Option<u64>,
    /// `--drain`, e.g. `"10s"`.
    pub drain: Option<String>,
    /// `--setup-timeout`.
    pub setup_timeout: Option<String>,
    /// `--reconnect`.
    pub reconnect: Option<bool>,
    /// Group share of phases that do not set their own.
    pub group_share: Option<f64>,
    /// `--threshold`, each.
    #[serde(default)]
    pub thresholds: Vec<String>,
    /// Group sizes.
    pub groups: Option<Groups>,
    /// Body sizes.
    pub body: Option<Body>,
    /// The phases, in order.
    #[serde(default, rename = "phase")]
    pub phases: Vec<Phase>,
}

/// `source_addrs = "127.0.1.1-127.0.1.8"` or `source_addrs = 8`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum SourceAddrs {
    /// A count from 127.0.1.1.
    Count(u32),
    /// A range or list.
    Spec(String),
}

/// `[groups]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Groups {
    /// `--groups`.
    pub count: Option<u32>,
    /// `--group-min`.
    pub min: Option<u32>,
    /// `--group-max`.
    pub max: Option<u32>,
    /// `--group-mean`.
    pub mean: Option<f64>,
}

/// `[body]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// `--body-min`.
    pub min: Option<u32>,
    /// `--body-bytes` (the mean).
    pub mean: Option<u32>,
    /// `--body-max`.
    pub max: Option<u32>,
}

/// `[[phase]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Its name [default: `phase-<n>`].
    pub name: Option<String>,
    /// How long it lasts, e.g. `"30s"`.
    pub duration: String,
    /// Messages per second (0: idle).
    #[serde(default)]
    pub rate: f64,
    /// Share of messages to groups [default: the file's `group_share`, else 0.2].
    pub group_share: Option<f64>,
    /// Share of delivered messages marked read.
    #[serde(default)]
    pub read_share: f64,
    /// Share of messages whose sender sends `Typing` just before.
    #[serde(default)]
    pub typing_share: f64,
    /// Share of connections that disconnect and reconnect per second.
    #[serde(default)]
    pub churn_per_s: f64,
}

impl Scenario {
    /// Reads and parses a scenario file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
        Self::parse(&text)
    }

    /// Parses scenario text.
    pub fn parse(text: &str) -> Result<Self, String> {
        // toml names the unknown key, the line and the keys it expected.
        toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', " "))
    }

    /// Applies the file to `args`, leaving alone every flag for which
    /// `given(flag id)` is true, and returns the phases it describes
    /// (checked).
    pub fn apply(
        &self,
        args: &mut Args,
        given: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<PhasePlan>, String> {
        macro_rules! set {
            ($id:literal, $field:ident, $value:expr) => {
                if let Some(v) = $value {
                    if !given($id) {
                        args.$field = v;
                    }
                }
            };
        }
        set!("url", url, self.url.clone());
        set!("connections", connections, self.connections);
        set!("ramp", ramp, self.ramp_rate);
        set!("workers", workers, self.workers.map(Some));
        set!("threads", threads, self.threads);
        set!(
            "source_addrs",
            source_addrs,
            self.source_addrs.as_ref().map(|s| Some(match s {
                SourceAddrs::Count(n) => n.to_string(),
                SourceAddrs::Spec(s) => s.clone(),
            }))
        );
        set!("seed", seed, self.seed);
        set!("reconnect", reconnect, self.reconnect);
        set!("drain", drain, dur("drain", self.drain.as_deref())?);
        set!(
            "setup_timeout",
            setup_timeout,
            dur("setup_timeout", self.setup_timeout.as_deref())?
        );
        set!("group_share", group_share, self.group_share);
        if let Some(g) = &self.groups {
            set!("groups", groups, g.count.map(Some));
            set!("group_min", group_min, g.min);
            set!("group_max", group_max, g.max);
            set!("group_mean", group_mean, g.mean);
        }
        if let Some(b) = &self.body {
            set!("body_bytes", body_bytes, b.mean.map(|m| m as usize));
            set!("body_min", body_min, b.min.map(Some));
            set!("body_max", body_max, b.max.map(Some));
        }
        if !given("thresholds") {
            args.thresholds.extend(self.thresholds.iter().cloned());
        }
        if self.phases.is_empty() {
            return Ok(Vec::new());
        }
        for flag in [
            "rate",
            "duration",
            "group_share",
            "read_share",
            "typing_share",
        ] {
            if given(flag) {
                return Err(format!(
                    "--{} cannot be combined with the file's [[phase]] tables",
                    flag.replace('_', "-")
                ));
            }
        }
        let default_share = self.group_share.unwrap_or(0.2);
        let mut phases = Vec::with_capacity(self.phases.len());
        for (n, p) in self.phases.iter().enumerate() {
            let name = p.name.clone().unwrap_or_else(|| format!("phase-{}", n + 1));
            let at = |key: &str| format!("phase `{name}`, key `{key}`");
            let duration =
                parse_duration(&p.duration).map_err(|e| format!("{}: {e}", at("duration")))?;
            if duration.is_zero() {
                return Err(format!("{}: must be more than 0", at("duration")));
            }
            if !(p.rate >= 0.0 && p.rate.is_finite()) {
                return Err(format!("{}: must be 0 or more", at("rate")));
            }
            let group_share = p.group_share.unwrap_or(default_share);
            for (key, v) in [
                ("group_share", group_share),
                ("read_share", p.read_share),
                ("typing_share", p.typing_share),
                ("churn_per_s", p.churn_per_s),
            ] {
                if !(0.0..=1.0).contains(&v) {
                    return Err(format!("{}: must be between 0 and 1, got {v}", at(key)));
                }
            }
            phases.push(PhasePlan {
                name,
                duration,
                rate: p.rate,
                group_share,
                read_share: p.read_share,
                typing_share: p.typing_share,
                churn_per_s: p.churn_per_s,
            });
        }
        Ok(phases)
    }
}

fn dur(key: &str, v: Option<&str>) -> Result<Option<std::time::Duration>, String> {
    v.map(|s| parse_duration(s).map_err(|e| format!("key `{key}`: {e}")))
        .transpose()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;

    const FULL: &str = r#"
name = "t"
connections = 500
ramp_rate = 250
workers = 2
source_addrs = 4
thresholds = ["lost == 0"]
[groups]
count = 10
mean = 8
max = 40
[body]
min = 40
mean = 200
max = 1000
[[phase]]
name = "idle"
duration = "2s"
[[phase]]
duration = "1m"
rate = 100
read_share = 0.5
churn_per_s = 0.01
"#;

    #[test]
    fn a_full_scenario_fills_the_flags() {
        let s = Scenario::parse(FULL).unwrap();
        let mut args = Args::parse_from(["loadgen"]);
        let phases = s.apply(&mut args, &|_| false).unwrap();
        assert_eq!(
            (args.connections, args.ramp, args.workers),
            (500, 250.0, Some(2))
        );
        assert_eq!(args.source_addrs.as_deref(), Some("4"));
        assert_eq!(
            (args.groups, args.group_max, args.group_mean),
            (Some(10), 40, 8.0)
        );
        assert_eq!(
            (args.body_min, args.body_bytes, args.body_max),
            (Some(40), 200, Some(1000))
        );
        assert_eq!(args.thresholds, vec!["lost == 0".to_string()]);
        assert_eq!(phases.len(), 2);
        assert_eq!((phases[0].name.as_str(), phases[0].rate), ("idle", 0.0));
        assert_eq!(phases[1].name, "phase-2");
        assert_eq!(phases[1].duration, std::time::Duration::from_secs(60));
        assert_eq!((phases[1].group_share, phases[1].read_share), (0.2, 0.5));
    }

    #[test]
    fn the_example_scenarios_parse_and_apply() {
        for (name, text) in [
            ("smoke", include_str!("../scenarios/smoke.toml")),
            ("idle-200k", include_str!("../scenarios/idle-200k.toml")),
            ("traffic", include_str!("../scenarios/traffic.toml")),
        ] {
            let s = Scenario::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(s.name.as_deref(), Some(name));
            let mut args = Args::parse_from(["loadgen"]);
            let phases = s.apply(&mut args, &|_| false).unwrap();
            assert!(!phases.is_empty(), "{name}");
            args.into_config().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn command_line_flags_win() {
        let s = Scenario::parse(FULL).unwrap();
        let mut args = Args::parse_from(["loadgen", "--connections", "7"]);
        s.apply(&mut args, &|id| id == "connections").unwrap();
        assert_eq!(args.connections, 7);
        let err = s.apply(&mut args, &|id| id == "rate").unwrap_err();
        assert!(err.contains("--rate"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        for (text, key) in [
            ("conections = 5", "conections"),
            ("[groups]\nsize = 3", "size"),
            ("[[phase]]\nduration = \"1s\"\nrte = 3", "rte"),
            ("[body]\navg = 3", "avg"),
        ] {
            let err = Scenario::parse(text).unwrap_err();
            assert!(err.contains(&format!("`{key}`")), "{text}: {err}");
        }
    }

    #[test]
    fn bad_phase_values_name_the_phase_and_key() {
        for (text, what) in [
            (
                "[[phase]]\nname = \"x\"\nduration = \"soon\"",
                "phase `x`, key `duration`",
            ),
            ("[[phase]]\nduration = \"1s\"\nrate = -1", "key `rate`"),
            (
                "[[phase]]\nduration = \"1s\"\nchurn_per_s = 2",
                "key `churn_per_s`",
            ),
            ("[[phase]]\nduration = \"0s\"", "key `duration`"),
        ] {
            let s = Scenario::parse(text).unwrap();
            let err = s
                .apply(&mut Args::parse_from(["loadgen"]), &|_| false)
                .unwrap_err();
            assert!(err.contains(what), "{text}: {err}");
        }
        assert!(Scenario::parse("[[phase]]\nrate = 1")
            .unwrap_err()
            .contains("duration"));
    }
}
