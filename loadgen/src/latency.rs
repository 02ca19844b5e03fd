//! Latency histograms, corrected for coordinated omission.
//!
//! Every clock starts at the message's *intended* send time from the
//! open-loop schedule, not at the moment loadgen got round to sending it.
//! A stalled server therefore shows up as latency for every message that
//! should have gone out during the stall, instead of as a quiet gap in
//! the samples (the "coordinated omission" a closed-loop generator has).
//!
//! Values are recorded in microseconds with three significant digits;
//! histograms from any number of workers merge exactly.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The histograms one worker keeps.
#[derive(Clone, Debug)]
pub struct Latencies {
    /// Intended send to SENT received.
    pub sent_ack: Histogram<u64>,
    /// Intended send to a recipient's receipt, one sample per first arrival.
    pub end_to_end: Histogram<u64>,
    /// Intended send to the moment loadgen wrote the send: how far behind
    /// its own schedule loadgen ran.
    pub schedule_lag: Histogram<u64>,
    /// Intended send to the sender receiving the first `Receipt` that says
    /// a direct message was delivered (a read says so too).
    pub receipt_delivered: Histogram<u64>,
    /// Intended send to the sender receiving the `Receipt` that says it
    /// was read.
    pub receipt_read: Histogram<u64>,
    /// A session that ended unasked (the server closed it, died or went
    /// silent) to the device's next session finishing its catch-up: how
    /// long a device was cut off. Churn and the run's end are not counted.
    pub reconnect: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    /// Empty histograms.
    pub fn new() -> Self {
        Self {
            sent_ack: histogram(),
            end_to_end: histogram(),
            schedule_lag: histogram(),
            receipt_delivered: histogram(),
            receipt_read: histogram(),
            reconnect: histogram(),
        }
    }

    /// Adds another worker's samples.
    pub fn merge(&mut self, other: &Latencies) {
        add(&mut self.sent_ack, &other.sent_ack);
        add(&mut self.end_to_end, &other.end_to_end);
        add(&mut self.schedule_lag, &other.schedule_lag);
        add(&mut self.receipt_delivered, &other.receipt_delivered);
        add(&mut self.receipt_read, &other.receipt_read);
        add(&mut self.reconnect, &other.reconnect);
    }

    /// Empties every histogram, keeping their allocations.
    pub fn reset(&mut self) {
        self.sent_ack.reset();
        self.end_to_end.reset();
        self.schedule_lag.reset();
        self.receipt_delivered.reset();
        self.receipt_read.reset();
        self.reconnect.reset();
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.sent_ack.is_empty()
            && self.end_to_end.is_empty()
            && self.schedule_lag.is_empty()
            && self.receipt_delivered.is_empty()
            && self.receipt_read.is_empty()
            && self.reconnect.is_empty()
    }
}

/// The three histograms in HdrHistogram's compressed V2 encoding, base64:
/// what crosses the pipe from worker processes and what the report keeps,
/// so histograms from runs and processes merge exactly, by any tool that
/// reads the format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encoded {
    /// `sent_ack`.
    pub sent_ack: String,
    /// `end_to_end`.
    pub end_to_end: String,
    /// `schedule_lag`.
    pub schedule_lag: String,
    /// `receipt_delivered` (absent in reports made before it existed).
    #[serde(default)]
    pub receipt_delivered: String,
    /// `receipt_read`.
    #[serde(default)]
    pub receipt_read: String,
    /// `reconnect`.
    #[serde(default)]
    pub reconnect: String,
}

impl Latencies {
    /// The histograms, encoded.
    pub fn encode(&self) -> Encoded {
        Encoded {
            sent_ack: encode(&self.sent_ack),
            end_to_end: encode(&self.end_to_end),
            schedule_lag: encode(&self.schedule_lag),
            receipt_delivered: encode(&self.receipt_delivered),
            receipt_read: encode(&self.receipt_read),
            reconnect: encode(&self.reconnect),
        }
    }

    /// Decodes what [`Latencies::encode`] made.
    pub fn decode(e: &Encoded) -> Result<Self, String> {
        Ok(Self {
            sent_ack: decode(&e.sent_ack)?,
            end_to_end: decode(&e.end_to_end)?,
            schedule_lag: decode(&e.schedule_lag)?,
            receipt_delivered: decode_or_empty(&e.receipt_delivered)?,
            receipt_read: decode_or_empty(&e.receipt_read)?,
            reconnect: decode_or_empty(&e.reconnect)?,
        })
    }
}

/// Like `decode`, with an empty string (an older report) an empty histogram.
fn decode_or_empty(s: &str) -> Result<Histogram<u64>, String> {
    if s.is_empty() {
        Ok(histogram())
    } else {
        decode(s)
    }
}

/// One histogram as base64 of its V2-deflate encoding.
pub fn encode(h: &Histogram<u64>) -> String {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail; an encoding error leaves it empty,
    // which decodes as an empty histogram.
    if V2DeflateSerializer::new().serialize(h, &mut out).is_err() {
        out.clear();
    }
    BASE64.encode(out)
}

/// Reads [`encode`]'s output (empty: an empty histogram).
pub fn decode(s: &str) -> Result<Histogram<u64>, String> {
    if s.is_empty() {
        return Ok(histogram());
    }
    let bytes = BASE64
        .decode(s)
        .map_err(|e| format!("histogram: bad base64: {e}"))?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("histogram: {e:?}"))?;
    // Recorded histograms auto-resize; decoded ones must too, to merge.
    let mut grown = histogram();
    grown
        .add(&h)
        .map_err(|e| format!("histogram: cannot merge: {e:?}"))?;
    Ok(grown)
}

/// An empty histogram that grows to fit what it records.
pub fn histogram() -> Histogram<u64> {
    // hdrhistogram refuses only precisions above 5 digits.
    Histogram::new(3).expect("3 significant digits is a valid precision")
}

/// Records a latency given in nanoseconds.
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    // An auto-resizing histogram takes any value below u64::MAX / 2.
    let _ = h.record((ns / 1000).max(1));
}

fn add(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    // Both grow on demand, so adding cannot run out of range.
    let _ = into.add(from);
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Summary {
    /// The percentiles of `h` (all zero when it is empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_equal_one_that_saw_everything() {
        let mut whole = Latencies::new();
        let mut parts = [Latencies::new(), Latencies::new(), Latencies::new()];
        for i in 0..30_000u64 {
            // 1 ms typical, a 250 ms tail one sample in a thousand.
            let ns = if i % 1000 == 0 {
                250_000_000
            } else {
                1_000_000 + (i % 977) * 1000
            };
            record_ns(&mut whole.end_to_end, ns);
            record_ns(&mut parts[(i % 3) as usize].end_to_end, ns);
        }
        let mut merged = Latencies::new();
        for p in &parts {
            merged.merge(p);
        }
        assert_eq!(
            Summary::of(&merged.end_to_end),
            Summary::of(&whole.end_to_end)
        );
        let s = Summary::of(&merged.end_to_end);
        assert_eq!(s.count, 30_000);
        assert!((s.p50 - 1.49).abs() < 0.02, "p50 {}", s.p50);
        assert!((s.max - 250.0).abs() < 0.5, "max {}", s.max);
        assert!(s.p999 < 3.0 && s.p99 < 3.0, "{s:?}");
    }

    #[test]
    fn encoded_histograms_decode_to_the_same_percentiles() {
        let mut l = Latencies::new();
        for i in 1..5000u64 {
            record_ns(&mut l.end_to_end, i * 7919 % 3_000_000 + 1000);
            record_ns(&mut l.sent_ack, i * 1000);
        }
        let back = Latencies::decode(&l.encode()).unwrap();
        assert_eq!(Summary::of(&back.end_to_end), Summary::of(&l.end_to_end));
        assert_eq!(Summary::of(&back.sent_ack), Summary::of(&l.sent_ack));
        assert!(back.schedule_lag.is_empty());
        // Decoded histograms still merge with freshly recorded ones.
        let mut merged = back;
        merged.merge(&l);
        assert_eq!(merged.end_to_end.len(), 2 * l.end_to_end.len());
        assert!(decode("not base64!").is_err());
    }

    #[test]
    fn empty_and_tiny_values() {
        let mut l = Latencies::new();
        assert!(l.is_empty());
        assert_eq!(Summary::of(&l.sent_ack), Summary::default());
        record_ns(&mut l.sent_ack, 10); // under a microsecond counts as one
        assert_eq!(Summary::of(&l.sent_ack).max, 0.001);
        l.reset();
        assert!(l.is_empty());
    }
}
