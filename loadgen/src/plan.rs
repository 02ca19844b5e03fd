//! The run's world and its schedule, computed from the seed alone.
//!
//! A [`Plan`] says which users exist (`lg-<run>-<n>`, device 1 each), which
//! conversations they are in, and, for every message index `i`, who sends it,
//! to which conversation and at what intended time. Every worker computes
//! the same plan from the same parameters, which is what lets a recipient
//! check that a message it got was really scheduled by its sender, and lets
//! the checker merge workers' results without shipping the schedule around.
//!
//! Conversations are numbered: direct conversations first (`0..directs`,
//! a ring pairing user `p` with user `p + 1`), then groups
//! (`directs..directs + groups`). Group ids are assigned by the server;
//! the plan only knows their members.

use std::time::Duration;

use rustc_hash::FxHashSet;

use crate::rng::{mix, SplitMix64};

/// What a plan is built from.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanParams {
    /// The run id, part of every user name and every body.
    pub run_id: u32,
    /// Seed of the plan and schedule.
    pub seed: u64,
    /// Number of users (one device, one connection each).
    pub users: u32,
    /// Number of groups to create (`None`: about one group per user on
    /// average, `users * 1 / group_mean`).
    pub groups: Option<u32>,
    /// Smallest group.
    pub group_min: u32,
    /// Largest group.
    pub group_max: u32,
    /// Target mean group size.
    pub group_mean: f64,
    /// Share of messages that go to a group.
    pub group_share: f64,
    /// Messages per second (0: no messages).
    pub rate: f64,
    /// How long the traffic phase lasts.
    pub duration: Duration,
    /// The traffic phases in order. Empty: one phase named `traffic` of
    /// `rate`, `duration` and `group_share`, with no read receipts or churn.
    pub phases: Vec<PhasePlan>,
    /// Body sizes: fixed when `min == max`, else drawn per message.
    pub body: BodySizes,
}

/// One phase of the traffic schedule. Phases follow each other without a
/// gap; message indices continue across them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PhasePlan {
    /// Its name (in progress lines and the report).
    pub name: String,
    /// How long it lasts.
    pub duration: Duration,
    /// Messages per second over all senders (0: idle, heartbeats only).
    pub rate: f64,
    /// Share of its messages that go to a group.
    pub group_share: f64,
    /// Share of delivered messages the recipient also marks read (a `Read`
    /// receipt instead of a `Delivered` one).
    pub read_share: f64,
    /// Share of messages whose sender says it is typing just before.
    pub typing_share: f64,
    /// Share of all connections that disconnect and reconnect per second.
    pub churn_per_s: f64,
}

/// Body sizes: `P(size)` proportional to `size^-a` on `[min, max]`, `a`
/// solved so the mean is `mean` (most bodies short, a tail of long ones);
/// `min == max` is a fixed size.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BodySizes {
    /// Smallest body (at least the stamp, 28 bytes).
    pub min: u32,
    /// Mean body size.
    pub mean: f64,
    /// Largest body.
    pub max: u32,
}

impl BodySizes {
    /// Every body `n` bytes long.
    pub fn fixed(n: u32) -> Self {
        Self {
            min: n,
            mean: f64::from(n),
            max: n,
        }
    }
}

/// A phase as the plan lays it out on the schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseSpan {
    /// The phase.
    pub plan: PhasePlan,
    /// Its first message index.
    pub first_msg: u64,
    /// How many messages it schedules: `floor(rate * duration)`.
    pub messages: u64,
    /// When it starts, ns after the traffic start.
    pub start_ns: u64,
}

impl PhaseSpan {
    /// When it ends, ns after the traffic start.
    pub fn end_ns(&self) -> u64 {
        self.start_ns + self.plan.duration.as_nanos() as u64
    }
}

/// Why a plan could not be built.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// Conversations need two users.
    #[error("at least 2 connections are needed (one conversation needs two users)")]
    TooFewUsers,
    /// The group size bounds make no sense.
    #[error("group sizes must satisfy 3 <= group-min <= group-max (got {0}..{1})")]
    GroupBounds(u32, u32),
    /// The body size bounds make no sense.
    #[error("body sizes must satisfy 28 <= min <= max (got {0}..{1})")]
    BodyBounds(u32, u32),
}

/// One scheduled message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    /// The message index (its client id is `msg + 1`).
    pub msg: u64,
    /// The sending user.
    pub sender: u32,
    /// The conversation number.
    pub conv: u32,
    /// When the message is meant to be sent, in ns after the traffic start.
    pub intended_ns: u64,
}

/// The world of one run. Immutable once built; shared by every worker.
#[derive(Debug)]
pub struct Plan {
    /// The run id.
    pub run_id: u32,
    seed: u64,
    users: u32,
    directs: u32,
    /// Members of each group; the first is its creator.
    groups: Vec<Vec<u32>>,
    /// The same members sorted, for membership tests.
    groups_sorted: Vec<Vec<u32>>,
    /// Conversation numbers of each user.
    user_convs: Vec<Vec<u32>>,
    phases: Vec<PhaseSpan>,
    total: u64,
    sizes: SizeDistribution,
    body: BodySizes,
    body_sizes: Option<SizeDistribution>,
}

const GROUPS_STREAM: u64 = 0x6772_6f75_7073; // "groups"
const SCHEDULE_STREAM: u64 = 0x7363_6865_6475; // "schedu"
const BODY_STREAM: u64 = 0x626f_6479; // "body"
const READ_STREAM: u64 = 0x7265_6164; // "read"
const TYPING_STREAM: u64 = 0x7479_7065; // "type"

impl Plan {
    /// Builds the plan for `p`.
    pub fn new(p: &PlanParams) -> Result<Self, PlanError> {
        if p.users < 2 {
            return Err(PlanError::TooFewUsers);
        }
        if p.group_min < 3 || p.group_min > p.group_max {
            return Err(PlanError::GroupBounds(p.group_min, p.group_max));
        }
        let users = p.users;
        let directs = if users == 2 { 1 } else { users };
        let sizes = SizeDistribution::new(p.group_min, p.group_max, p.group_mean);
        let wanted = match p.groups {
            Some(n) => n,
            None if users < p.group_min => 0,
            None => (f64::from(users) / p.group_mean.max(1.0)).ceil() as u32,
        };
        let groups = if users < 3 {
            Vec::new()
        } else {
            draw_groups(p.seed, users, wanted, &sizes)
        };
        let groups_sorted: Vec<Vec<u32>> = groups.iter().map(|m| sorted(m)).collect();

        let mut user_convs: Vec<Vec<u32>> = (0..users)
            .map(|u| {
                if users == 2 {
                    vec![0]
                } else {
                    vec![u, (u + users - 1) % users]
                }
            })
            .collect();
        for (g, members) in groups.iter().enumerate() {
            for &m in members {
                user_convs[m as usize].push(directs + g as u32);
            }
        }
        let phase_plans = if p.phases.is_empty() {
            vec![PhasePlan {
                name: "traffic".into(),
                duration: p.duration,
                rate: p.rate,
                group_share: p.group_share,
                read_share: 0.0,
                typing_share: 0.0,
                churn_per_s: 0.0,
            }]
        } else {
            p.phases.clone()
        };
        let mut phases = Vec::with_capacity(phase_plans.len());
        let (mut first_msg, mut start_ns) = (0u64, 0u64);
        for plan in phase_plans {
            let messages = if plan.rate > 0.0 {
                (plan.rate * plan.duration.as_secs_f64()).floor() as u64
            } else {
                0
            };
            let span = PhaseSpan {
                plan,
                first_msg,
                messages,
                start_ns,
            };
            first_msg += messages;
            start_ns = span.end_ns();
            phases.push(span);
        }
        let total = first_msg;
        if p.body.min as usize > p.body.max as usize
            || (p.body.min as usize) < crate::body::HEADER_LEN
        {
            return Err(PlanError::BodyBounds(p.body.min, p.body.max));
        }
        let body_sizes = (p.body.min != p.body.max)
            .then(|| SizeDistribution::new(p.body.min, p.body.max, p.body.mean));
        Ok(Self {
            run_id: p.run_id,
            seed: p.seed,
            users,
            directs,
            groups,
            groups_sorted,
            user_convs,
            phases,
            total,
            sizes,
            body: p.body,
            body_sizes,
        })
    }

    /// Number of users.
    pub fn users(&self) -> u32 {
        self.users
    }

    /// Number of direct conversations.
    pub fn directs(&self) -> u32 {
        self.directs
    }

    /// Number of groups.
    pub fn groups(&self) -> u32 {
        self.groups.len() as u32
    }

    /// Number of conversations of both kinds.
    pub fn conversations(&self) -> u32 {
        self.directs + self.groups()
    }

    /// Number of messages the schedule holds.
    pub fn total_messages(&self) -> u64 {
        self.total
    }

    /// The exponent of the group size distribution, solved for the mean.
    pub fn size_exponent(&self) -> f64 {
        self.sizes.exponent
    }

    /// The name of user `u`.
    pub fn user_name(&self, u: u32) -> String {
        format!("lg-{:08x}-{u}", self.run_id)
    }

    /// The user a name belongs to, if it is one of this run's.
    pub fn parse_user(&self, name: &str) -> Option<u32> {
        let rest = name.strip_prefix("lg-")?;
        let (run, n) = rest.split_once('-')?;
        if run.len() != 8 || u32::from_str_radix(run, 16).ok()? != self.run_id {
            return None;
        }
        if n.len() > 1 && n.starts_with('0') {
            return None;
        }
        let u: u32 = n.parse().ok()?;
        (u < self.users).then_some(u)
    }

    /// Conversation number of group `g`.
    pub fn group_conv(&self, g: u32) -> u32 {
        self.directs + g
    }

    /// The group a conversation number names, if it is a group.
    pub fn conv_group(&self, conv: u32) -> Option<u32> {
        conv.checked_sub(self.directs)
            .filter(|&g| g < self.groups())
    }

    /// Members of group `g`, its creator first.
    pub fn group_members(&self, g: u32) -> &[u32] {
        self.groups.get(g as usize).map_or(&[], Vec::as_slice)
    }

    /// Members of group `g` in ascending order.
    pub fn group_members_sorted(&self, g: u32) -> &[u32] {
        self.groups_sorted
            .get(g as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// The two users of direct conversation `conv`.
    pub fn direct_pair(&self, conv: u32) -> (u32, u32) {
        (conv, (conv + 1) % self.users)
    }

    /// Members of any conversation.
    pub fn members(&self, conv: u32) -> Members<'_> {
        match self.conv_group(conv) {
            Some(g) => Members::Group(self.group_members_sorted(g)),
            None => {
                let (a, b) = self.direct_pair(conv);
                Members::Direct([a, b])
            }
        }
    }

    /// True when `user` is a member of `conv`.
    pub fn is_member(&self, conv: u32, user: u32) -> bool {
        match self.conv_group(conv) {
            Some(g) => self.group_members_sorted(g).binary_search(&user).is_ok(),
            None if conv < self.directs => {
                let (a, b) = self.direct_pair(conv);
                user == a || user == b
            }
            None => false,
        }
    }

    /// How many devices receive a message sent to `conv` (every member but
    /// the sender: each user has one device).
    pub fn recipients(&self, conv: u32) -> u32 {
        match self.conv_group(conv) {
            Some(g) => self.group_members(g).len().saturating_sub(1) as u32,
            None => 1,
        }
    }

    /// Conversation numbers `user` belongs to.
    pub fn user_conversations(&self, user: u32) -> &[u32] {
        self.user_convs
            .get(user as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// The id of direct conversation `conv`.
    pub fn direct_id(&self, conv: u32) -> String {
        let (a, b) = self.direct_pair(conv);
        courier_protocol::ids::direct_conversation(&self.user_name(a), &self.user_name(b))
    }

    /// Mean size of the groups drawn.
    pub fn group_size_mean(&self) -> f64 {
        if self.groups.is_empty() {
            return 0.0;
        }
        self.groups.iter().map(Vec::len).sum::<usize>() as f64 / self.groups.len() as f64
    }

    /// Largest group drawn.
    pub fn group_size_max(&self) -> u32 {
        self.groups.iter().map(Vec::len).max().unwrap_or(0) as u32
    }

    /// The phases of the schedule, in order.
    pub fn phases(&self) -> &[PhaseSpan] {
        &self.phases
    }

    /// The phase message `i` belongs to.
    pub fn phase_of(&self, i: u64) -> &PhaseSpan {
        let k = self
            .phases
            .partition_point(|p| p.first_msg + p.messages <= i)
            .min(self.phases.len() - 1);
        &self.phases[k]
    }

    /// The phase running `ns` after the traffic start (the last one once
    /// all have ended).
    pub fn phase_at(&self, ns: u64) -> &PhaseSpan {
        let k = self
            .phases
            .partition_point(|p| p.end_ns() <= ns)
            .min(self.phases.len() - 1);
        &self.phases[k]
    }

    /// How long the whole schedule lasts.
    pub fn duration(&self) -> Duration {
        self.phases
            .iter()
            .map(|p| p.plan.duration)
            .sum::<Duration>()
    }

    /// When message `i` is meant to be sent, in ns after the traffic start.
    pub fn intended_ns(&self, i: u64) -> u64 {
        let p = self.phase_of(i);
        if p.plan.rate <= 0.0 {
            return p.start_ns;
        }
        p.start_ns + ((i - p.first_msg) as f64 * 1e9 / p.plan.rate) as u64
    }

    /// The body sizes drawn from.
    pub fn body_sizes(&self) -> BodySizes {
        self.body
    }

    /// The body length of message `i`. Pure, like the rest of the schedule.
    pub fn body_len(&self, i: u64) -> usize {
        match &self.body_sizes {
            None => self.body.min as usize,
            Some(d) => {
                let u = SplitMix64::new(mix(self.seed ^ BODY_STREAM, i)).unit();
                d.sample(u) as usize
            }
        }
    }

    /// Whether `user` marks message `i` read once it holds it: drawn with
    /// the read share of the message's phase. Pure.
    pub fn reads(&self, user: u32, i: u64) -> bool {
        let share = self.phase_of(i).plan.read_share;
        share > 0.0
            && SplitMix64::new(mix(self.seed ^ READ_STREAM, i ^ (u64::from(user) << 40))).unit()
                < share
    }

    /// Whether the sender of message `i` sends `Typing` just before it:
    /// drawn with the typing share of the message's phase. Pure.
    pub fn types(&self, i: u64) -> bool {
        let share = self.phase_of(i).plan.typing_share;
        share > 0.0 && SplitMix64::new(mix(self.seed ^ TYPING_STREAM, i)).unit() < share
    }

    /// Message `i` of the schedule. Pure: any worker computes the same.
    ///
    /// A message goes to a group with its phase's group share (a group
    /// chosen uniformly, then a sender uniformly among its members, so the
    /// fan-out a message sees follows the group size distribution);
    /// otherwise a uniformly chosen user sends to one of its two direct
    /// conversations.
    pub fn message(&self, i: u64) -> Scheduled {
        let group_share = self.phase_of(i).plan.group_share;
        let mut r = SplitMix64::new(mix(self.seed ^ SCHEDULE_STREAM, i));
        let to_group = !self.groups.is_empty() && r.unit() < group_share;
        let (sender, conv) = if to_group {
            let g = r.below(self.groups.len() as u64) as u32;
            let members = self.group_members(g);
            let sender = members[r.below(members.len() as u64) as usize];
            (sender, self.group_conv(g))
        } else {
            let sender = r.below(u64::from(self.users)) as u32;
            let conv = if self.users == 2 || r.next_u64() & 1 == 0 {
                sender.min(self.directs - 1)
            } else {
                (sender + self.users - 1) % self.users
            };
            (sender, conv)
        };
        Scheduled {
            msg: i,
            sender,
            conv,
            intended_ns: self.intended_ns(i),
        }
    }
}

/// The members of a conversation, in ascending order.
#[derive(Clone, Copy, Debug)]
pub enum Members<'a> {
    /// The two users of a direct conversation.
    Direct([u32; 2]),
    /// A group's members.
    Group(&'a [u32]),
}

impl Members<'_> {
    /// The members as a slice.
    pub fn as_slice(&self) -> &[u32] {
        match self {
            Self::Direct(pair) => pair,
            Self::Group(m) => m,
        }
    }
}

/// Group sizes on `[min, max]` with `P(s)` proportional to `s^-exponent`,
/// the exponent solved so the mean is as near the target as the bounds
/// allow: most groups small, a long tail of big ones.
#[derive(Clone, Debug)]
pub struct SizeDistribution {
    min: u32,
    /// Cumulative probability of each size from `min` up.
    cdf: Vec<f64>,
    /// The exponent found.
    pub exponent: f64,
}

impl SizeDistribution {
    /// The distribution on `[min, max]` whose mean is nearest `mean`.
    pub fn new(min: u32, max: u32, mean: f64) -> Self {
        let mean_of = |a: f64| {
            let (mut w, mut ws) = (0.0, 0.0);
            for s in min..=max {
                let p = f64::from(s).powf(-a);
                w += p;
                ws += p * f64::from(s);
            }
            ws / w
        };
        // The mean falls as the exponent grows; bisect on [-40, 40], wide
        // enough to pin the mean to either bound (200^40 still fits an f64).
        let (mut lo, mut hi) = (-40.0f64, 40.0f64);
        for _ in 0..80 {
            let mid = (lo + hi) / 2.0;
            if mean_of(mid) > mean {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let exponent = (lo + hi) / 2.0;
        let weights: Vec<f64> = (min..=max).map(|s| f64::from(s).powf(-exponent)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Self { min, cdf, exponent }
    }

    /// The size at cumulative probability `u` in `[0, 1)`.
    pub fn sample(&self, u: f64) -> u32 {
        let i = self
            .cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len().saturating_sub(1));
        self.min + i as u32
    }

    /// The distribution's mean.
    pub fn mean(&self) -> f64 {
        let mut prev = 0.0;
        let mut mean = 0.0;
        for (i, &c) in self.cdf.iter().enumerate() {
            mean += (c - prev) * f64::from(self.min + i as u32);
            prev = c;
        }
        mean
    }
}

/// Draws `wanted` groups with distinct member sets. Members come from a
/// stream of shuffled permutations of all users, so every user lands in
/// about the same number of groups.
fn draw_groups(seed: u64, users: u32, wanted: u32, sizes: &SizeDistribution) -> Vec<Vec<u32>> {
    let mut rng = SplitMix64::new(mix(seed, GROUPS_STREAM));
    let mut perm: Vec<u32> = (0..users).collect();
    rng.shuffle(&mut perm);
    let mut next = 0usize;
    // Stratified sizes: group k draws from the k-th of `wanted` equal slices
    // of the distribution (in shuffled order), so even 50 groups have a mean
    // near the target instead of whatever a few tail draws make it.
    let mut strata: Vec<u32> = (0..wanted).collect();
    rng.shuffle(&mut strata);
    let mut seen: FxHashSet<Vec<u32>> = FxHashSet::default();
    let mut groups = Vec::with_capacity(wanted as usize);
    for stratum in strata {
        let u = (f64::from(stratum) + rng.unit()) / f64::from(wanted);
        let size = sizes.sample(u).min(users);
        let mut members = Vec::with_capacity(size as usize);
        // Two full permutations always hold `size <= users` distinct users.
        for _ in 0..2 * users as usize {
            if members.len() == size as usize {
                break;
            }
            if next == perm.len() {
                rng.shuffle(&mut perm);
                next = 0;
            }
            let u = perm[next];
            next += 1;
            if !members.contains(&u) {
                members.push(u);
            }
        }
        // A member set already taken would make the group's creation entry
        // ambiguous to its members; redraw at random a bounded number of
        // times, then give the group up.
        let mut tries = 0;
        while seen.contains(&sorted(&members)) && tries < 16 {
            members.clear();
            while members.len() < size as usize {
                let u = rng.below(u64::from(users)) as u32;
                if !members.contains(&u) {
                    members.push(u);
                }
            }
            tries += 1;
        }
        if seen.insert(sorted(&members)) {
            groups.push(members);
        }
    }
    groups
}

fn sorted(members: &[u32]) -> Vec<u32> {
    let mut v = members.to_vec();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(users: u32) -> PlanParams {
        PlanParams {
            run_id: 0xabcd_0123,
            seed: 42,
            users,
            groups: None,
            group_min: 3,
            group_max: 200,
            group_mean: 20.0,
            group_share: 0.2,
            rate: 1000.0,
            duration: Duration::from_secs(10),
            phases: Vec::new(),
            body: BodySizes::fixed(200),
        }
    }

    #[test]
    fn size_distribution_hits_the_mean_and_bounds() {
        let d = SizeDistribution::new(3, 200, 20.0);
        assert!((d.mean() - 20.0).abs() < 0.01, "mean {}", d.mean());
        assert!(
            d.exponent > 0.5 && d.exponent < 3.0,
            "exponent {}",
            d.exponent
        );
        let mut r = SplitMix64::new(9);
        let samples: Vec<u32> = (0..100_000).map(|_| d.sample(r.unit())).collect();
        assert!(samples.iter().all(|s| (3..=200).contains(s)));
        let mean = samples.iter().map(|&s| f64::from(s)).sum::<f64>() / samples.len() as f64;
        assert!((mean - 20.0).abs() < 1.0, "sampled mean {mean}");
        // Most groups are small.
        let small = samples.iter().filter(|&&s| s <= 10).count();
        assert!(
            small * 2 > samples.len(),
            "{small} of {} are 10 or less",
            samples.len()
        );
    }

    #[test]
    fn unreachable_mean_is_clamped_to_the_bounds() {
        let d = SizeDistribution::new(3, 5, 50.0);
        assert!(d.mean() > 4.9);
        assert_eq!(d.sample(0.999_999), 5);
    }

    #[test]
    fn the_plan_is_a_function_of_its_parameters() {
        let a = Plan::new(&params(1000)).unwrap();
        let b = Plan::new(&params(1000)).unwrap();
        assert_eq!(a.groups, b.groups);
        for i in [0, 1, 777, 9999] {
            assert_eq!(a.message(i), b.message(i));
        }
        let mut other = params(1000);
        other.seed = 43;
        let c = Plan::new(&other).unwrap();
        assert_ne!(a.groups, c.groups);
    }

    #[test]
    fn groups_cover_users_with_distinct_member_sets() {
        let plan = Plan::new(&params(1000)).unwrap();
        assert_eq!(plan.groups(), 50);
        let mut sets: Vec<&[u32]> = (0..plan.groups())
            .map(|g| plan.group_members_sorted(g))
            .collect();
        sets.sort();
        sets.dedup();
        assert_eq!(sets.len(), 50);
        for g in 0..plan.groups() {
            let m = plan.group_members(g);
            assert!(m.len() >= 3 && m.len() <= 200);
            assert_eq!(
                plan.group_members_sorted(g)
                    .windows(2)
                    .filter(|w| w[0] == w[1])
                    .count(),
                0
            );
            for &u in m {
                assert!(plan.user_conversations(u).contains(&plan.group_conv(g)));
                assert!(plan.is_member(plan.group_conv(g), u));
            }
        }
        let mean = plan.group_size_mean();
        assert!((mean - 20.0).abs() < 2.0, "realised mean {mean}");
    }

    #[test]
    fn realised_mean_stays_near_the_target_at_every_scale() {
        for users in [1000, 2000, 10_000, 15_000, 100_000] {
            let plan = Plan::new(&params(users)).unwrap();
            let mean = plan.group_size_mean();
            assert!(
                (mean - 20.0).abs() < 1.5,
                "{users} users: realised mean {mean}"
            );
        }
    }

    #[test]
    fn tiny_worlds_still_work() {
        let two = Plan::new(&params(2)).unwrap();
        assert_eq!((two.directs(), two.groups()), (1, 0));
        for i in 0..100 {
            let m = two.message(i);
            assert_eq!(m.conv, 0);
            assert!(two.is_member(0, m.sender));
        }
        let three = Plan::new(&params(3)).unwrap();
        assert_eq!(three.groups(), 1);
        assert_eq!(three.group_members(0).len(), 3);
        assert_eq!(Plan::new(&params(1)).unwrap_err(), PlanError::TooFewUsers);
    }

    #[test]
    fn schedule_is_open_loop_and_mixes_kinds() {
        let plan = Plan::new(&params(1000)).unwrap();
        assert_eq!(plan.total_messages(), 10_000);
        assert_eq!(plan.intended_ns(0), 0);
        assert_eq!(plan.intended_ns(1000), 1_000_000_000);
        assert_eq!(plan.intended_ns(1), 1_000_000);
        let mut to_groups = 0;
        let mut senders = FxHashSet::default();
        for i in 0..plan.total_messages() {
            let m = plan.message(i);
            assert!(plan.is_member(m.conv, m.sender), "{m:?}");
            assert!(plan.user_conversations(m.sender).contains(&m.conv));
            if plan.conv_group(m.conv).is_some() {
                to_groups += 1;
            }
            senders.insert(m.sender);
        }
        let share = f64::from(to_groups) / plan.total_messages() as f64;
        assert!((share - 0.2).abs() < 0.02, "group share {share}");
        assert!(senders.len() > 950, "{} distinct senders", senders.len());
    }

    #[test]
    fn names_round_trip_and_foreign_names_are_refused() {
        let plan = Plan::new(&params(10)).unwrap();
        assert_eq!(plan.user_name(7), "lg-abcd0123-7");
        assert_eq!(plan.parse_user("lg-abcd0123-7"), Some(7));
        for bad in [
            "lg-abcd0123-10",
            "lg-abcd0124-7",
            "lg-abcd0123-07",
            "alice",
            "lg-abcd0123-",
            "lg-x-1",
        ] {
            assert_eq!(plan.parse_user(bad), None, "{bad}");
        }
        assert_eq!(plan.direct_id(9), "d:lg-abcd0123-0:lg-abcd0123-9");
        assert_eq!(plan.direct_pair(9), (9, 0));
    }

    #[test]
    fn phases_continue_the_schedule_and_carry_their_mix() {
        let mut p = params(100);
        let phase = |name: &str, secs: u64, rate: f64, group_share: f64| PhasePlan {
            name: name.into(),
            duration: Duration::from_secs(secs),
            rate,
            group_share,
            read_share: 0.5,
            typing_share: 0.0,
            churn_per_s: 0.0,
        };
        p.phases = vec![
            phase("idle", 2, 0.0, 0.2),
            phase("direct", 1, 100.0, 0.0),
            phase("groups", 2, 50.0, 1.0),
        ];
        let plan = Plan::new(&p).unwrap();
        assert_eq!(plan.total_messages(), 200);
        assert_eq!(plan.duration(), Duration::from_secs(5));
        assert_eq!(plan.intended_ns(0), 2_000_000_000);
        assert_eq!(plan.intended_ns(99), 2_990_000_000);
        assert_eq!(plan.intended_ns(100), 3_000_000_000);
        assert_eq!(plan.intended_ns(101), 3_020_000_000);
        assert_eq!(plan.phase_of(150).plan.name, "groups");
        assert_eq!(plan.phase_at(500_000_000).plan.name, "idle");
        assert_eq!(plan.phase_at(9_000_000_000).plan.name, "groups");
        for i in 0..100 {
            assert!(plan.conv_group(plan.message(i).conv).is_none());
        }
        for i in 100..200 {
            assert!(plan.conv_group(plan.message(i).conv).is_some());
        }
        let reads = (0..200).filter(|&i| plan.reads(7, i)).count();
        assert!((60..140).contains(&reads), "{reads} of 200 read");
    }

    #[test]
    fn body_sizes_are_drawn_per_message_around_the_mean() {
        let mut p = params(100);
        assert!((0..50).all(|i| Plan::new(&p).unwrap().body_len(i) == 200));
        p.body = BodySizes {
            min: 40,
            mean: 200.0,
            max: 2000,
        };
        let plan = Plan::new(&p).unwrap();
        let lens: Vec<usize> = (0..10_000).map(|i| plan.body_len(i)).collect();
        assert!(lens.iter().all(|l| (40..=2000).contains(l)));
        let mean = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
        assert!((mean - 200.0).abs() < 20.0, "mean {mean}");
        assert_eq!(plan.body_len(77), Plan::new(&p).unwrap().body_len(77));
        p.body.min = 10;
        assert!(matches!(
            Plan::new(&p),
            Err(PlanError::BodyBounds(10, 2000))
        ));
    }

    #[test]
    fn zero_rate_schedules_nothing() {
        let mut p = params(100);
        p.rate = 0.0;
        assert_eq!(Plan::new(&p).unwrap().total_messages(), 0);
    }
}
