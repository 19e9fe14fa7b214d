//! The speed layer's update plan, compiled from the spec's streaming views: which partial
//! aggregates each entity keeps per tile, per session and per latest value, and how far back
//! its state must reach.

use std::fmt;

use duet_spec::duration::Duration;
use duet_spec::{Agg, Aggregation, Extent, Feature, Layer, Measure, Spec, View};

/// Where a measure's partials live.
#[derive(Debug, Clone, PartialEq)]
pub enum Home {
    /// Tiles of a resolution group (index into [`SpeedPlan::resolutions`]).
    Tiles(usize),
    /// A session group (index into [`SpeedPlan::gaps`]).
    Session(usize),
    /// A latest-value slot with a time-to-live.
    Recent,
}

/// One measure the state keeps partials for.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasureSlot {
    /// The measure.
    pub measure: Measure,
    /// Where its partials live.
    pub home: Home,
}

/// How a feature is evaluated from slots.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureRecipe {
    /// One measure.
    Measure(usize),
    /// Numerator and denominator measures.
    Ratio(usize, usize),
}

/// A streaming feature compiled for the speed layer.
#[derive(Debug, Clone)]
pub struct SpeedFeature {
    /// The feature.
    pub feature: Feature,
    /// Its view's name.
    pub view: String,
    /// How it is evaluated.
    pub recipe: FeatureRecipe,
}

/// Every streaming feature of a spec, compiled.
#[derive(Debug, Clone)]
pub struct SpeedPlan {
    /// The features, in spec order.
    pub features: Vec<SpeedFeature>,
    /// The measures kept; features share identical ones.
    pub slots: Vec<MeasureSlot>,
    /// Tile sizes in milliseconds (each a resolution group).
    pub resolutions: Vec<i64>,
    /// The largest window of each resolution group, in milliseconds.
    pub group_windows: Vec<i64>,
    /// Session gaps in milliseconds (each a session group).
    pub gaps: Vec<i64>,
    /// The allowed lateness (the largest of the streaming views').
    pub lateness: i64,
    /// How far behind the watermark every accepted event is kept in the entity's history (the
    /// largest of the streaming views' `history`; 0: no history).
    pub history: i64,
    /// The alignment of the state boundary: a multiple of every resolution.
    pub alignment: i64,
    /// How far behind its newest event an entity's state can still matter.
    pub horizon: i64,
    /// The spec's fingerprint, recorded beside the state.
    pub spec_fingerprint: String,
    /// Per resolution group, the slots kept in its tiles.
    pub tile_slots: Vec<Vec<usize>>,
    /// Per session group, the slots kept in its sessions.
    pub session_slots: Vec<Vec<usize>>,
    /// The latest-value slots.
    pub recent_slots: Vec<usize>,
}

impl SpeedPlan {
    /// Compiles the streaming views of `spec`.
    pub fn compile(spec: &Spec) -> SpeedPlan {
        let mut plan = SpeedPlan {
            features: Vec::new(),
            slots: Vec::new(),
            resolutions: Vec::new(),
            group_windows: Vec::new(),
            gaps: Vec::new(),
            lateness: 0,
            history: 0,
            alignment: 1,
            horizon: 0,
            spec_fingerprint: streaming_fingerprint(spec),
            tile_slots: Vec::new(),
            session_slots: Vec::new(),
            recent_slots: Vec::new(),
        };
        for view in spec.views_of(Layer::Streaming) {
            plan.lateness = plan.lateness.max(view.allowed_lateness.as_ms());
            plan.history = plan.history.max(view.history.as_ms());
            for f in &view.features {
                plan.add_feature(view, f);
            }
        }
        plan.alignment = plan.resolutions.iter().fold(1i64, |a, r| lcm(a, *r));
        plan.tile_slots = vec![Vec::new(); plan.resolutions.len()];
        plan.session_slots = vec![Vec::new(); plan.gaps.len()];
        for (i, s) in plan.slots.iter().enumerate() {
            match s.home {
                Home::Tiles(g) => plan.tile_slots[g].push(i),
                Home::Session(g) => plan.session_slots[g].push(i),
                Home::Recent => plan.recent_slots.push(i),
            }
        }
        plan.horizon = plan
            .features
            .iter()
            .map(|f| match f.feature.extent {
                Extent::Sliding { window, resolution } => window.as_ms() + resolution.as_ms(),
                Extent::Session { gap } => gap.as_ms(),
                Extent::Recent { ttl } => ttl.as_ms(),
                Extent::AllHistory => 0,
            })
            .max()
            .unwrap_or(0);
        plan
    }

    fn add_feature(&mut self, view: &View, f: &Feature) {
        let home = match f.extent {
            Extent::Sliding { window, resolution } => {
                let r = resolution.as_ms();
                let g = match self.resolutions.iter().position(|x| *x == r) {
                    Some(g) => g,
                    None => {
                        self.resolutions.push(r);
                        self.group_windows.push(0);
                        self.resolutions.len() - 1
                    }
                };
                self.group_windows[g] = self.group_windows[g].max(window.as_ms());
                Home::Tiles(g)
            }
            Extent::Session { gap } => {
                let g = gap.as_ms();
                Home::Session(match self.gaps.iter().position(|x| *x == g) {
                    Some(i) => i,
                    None => {
                        self.gaps.push(g);
                        self.gaps.len() - 1
                    }
                })
            }
            Extent::Recent { .. } => Home::Recent,
            Extent::AllHistory => unreachable!("validated: streaming features are bounded"),
        };
        let recipe = match &f.aggregation {
            Aggregation::Measure(m) => FeatureRecipe::Measure(self.slot(m, home)),
            Aggregation::Ratio {
                numerator,
                denominator,
            } => FeatureRecipe::Ratio(
                self.slot(numerator, home.clone()),
                self.slot(denominator, home),
            ),
            _ => unreachable!("validated: batch-only aggregations are refused in streaming views"),
        };
        self.features.push(SpeedFeature {
            feature: f.clone(),
            view: view.name.clone(),
            recipe,
        });
    }

    fn slot(&mut self, m: &Measure, home: Home) -> usize {
        let slot = MeasureSlot {
            measure: m.clone(),
            home,
        };
        match self.slots.iter().position(|s| *s == slot) {
            Some(i) => i,
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        }
    }

    /// The TTL of a [`Home::Recent`] slot's feature.
    pub fn recent_ttl(&self, slot: usize) -> i64 {
        self.features
            .iter()
            .filter_map(|f| match (&f.recipe, f.feature.extent) {
                (FeatureRecipe::Measure(s), Extent::Recent { ttl }) if *s == slot => {
                    Some(ttl.as_ms())
                }
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// True when a measure uses `count_distinct` (its partials keep sets).
    pub fn is_distinct(&self, slot: usize) -> bool {
        self.slots[slot].measure.agg == Agg::CountDistinct
    }
}

/// A digest of the streaming views only: changing a batch feature does not change the meaning
/// of the speed layer's state.
fn streaming_fingerprint(spec: &Spec) -> String {
    let views: Vec<&View> = spec.views_of(Layer::Streaming).collect();
    let text = serde_json::to_string(&views).expect("views serialize");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: i64, b: i64) -> i64 {
    a / gcd(a, b) * b
}

impl fmt::Display for SpeedPlan {
    /// The plan as reviewers read it in snapshot tests.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |ms: i64| Duration::from_ms(ms).to_string();
        writeln!(
            f,
            "lateness {}, boundary alignment {}, horizon {}",
            d(self.lateness),
            d(self.alignment),
            d(self.horizon)
        )?;
        for (g, r) in self.resolutions.iter().enumerate() {
            writeln!(
                f,
                "tile group {g}: {} tiles, longest window {}",
                d(*r),
                d(self.group_windows[g])
            )?;
        }
        for (g, gap) in self.gaps.iter().enumerate() {
            writeln!(f, "session group {g}: gap {}", d(*gap))?;
        }
        for (i, s) in self.slots.iter().enumerate() {
            let home = match s.home {
                Home::Tiles(g) => format!("tiles of group {g}"),
                Home::Session(g) => format!("sessions of group {g}"),
                Home::Recent => format!("latest value, ttl {}", d(self.recent_ttl(i))),
            };
            writeln!(f, "slot {i}: {} in {home}", s.measure)?;
        }
        for sf in &self.features {
            let how = match sf.recipe {
                FeatureRecipe::Measure(s) => format!("slot {s}"),
                FeatureRecipe::Ratio(n, d) => format!("slot {n} / slot {d}"),
            };
            writeln!(
                f,
                "feature {}:{} = {how} ({})",
                sf.view, sf.feature.name, sf.feature.extent
            )?;
        }
        Ok(())
    }
}
