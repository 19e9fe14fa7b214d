//! From TOML text to a validated [`Spec`], with every problem located at `file:line:col`.

use std::collections::HashMap;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diagnostic::{Reporter, SpecErrors, did_you_mean};
use crate::duration::Duration;
use crate::expr::{Expr, Field, Type};
use crate::model::{
    Agg, Aggregation, Entity, Extent, Feature, Filter, Layer, Measure, Spec, Tolerance, Value,
    ValueType, View,
};

/// The lateness allowed when a streaming view does not say.
pub const DEFAULT_LATENESS: Duration = Duration::from_ms(10 * crate::duration::MINUTE_MS);
/// The batch cadence when a batch view does not say.
pub const DEFAULT_CADENCE: Duration = Duration::from_ms(crate::duration::DAY_MS);

const TOP_KEYS: &[&str] = &["version", "entity", "view"];
const ENTITY_KEYS: &[&str] = &["name", "join_key", "description"];
const VIEW_KEYS: &[&str] = &[
    "name",
    "entity",
    "layer",
    "ttl",
    "cadence",
    "allowed_lateness",
    "history",
    "description",
    "feature",
];
const FEATURE_KEYS: &[&str] = &[
    "name",
    "version",
    "description",
    "aggregation",
    "value",
    "where",
    "window",
    "resolution",
    "session_gap",
    "ttl",
    "unit",
    "numerator",
    "denominator",
    "of",
    "round",
    "default",
    "tolerance",
];
const MEASURE_KEYS: &[&str] = &["aggregation", "value", "where"];
const AGGREGATIONS: &[&str] = &[
    "count",
    "sum",
    "mean",
    "min",
    "max",
    "count_distinct",
    "last",
    "duration",
    "ratio",
    "pct_rank",
    "age",
];
const INNER_AGGREGATIONS: &[&str] = &["count", "sum", "mean", "min", "max", "count_distinct"];

type Span = Range<usize>;
type Item<'i> = Spanned<DeValue<'i>>;

/// Parses and validates a spec. `file` names the text in error messages.
pub fn parse_spec(file: &str, text: &str) -> Result<Spec, SpecErrors> {
    let mut r = Reporter::new(file, text);
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let msg = e.message().trim().replace('\n', " ");
            r.at_offset(
                offset,
                format!(
                    "TOML syntax error: {msg}; fix the syntax (see docs/spec.md for the format)"
                ),
            );
            return r.into_result(dummy_spec());
        }
    };
    let spec = Parser { r: &mut r }.spec(root.get_ref());
    r.into_result(spec)
}

fn dummy_spec() -> Spec {
    Spec {
        version: 0,
        entities: vec![],
        views: vec![],
    }
}

struct Parser<'r, 'a> {
    r: &'r mut Reporter<'a>,
}

/// A table being read: which keys exist, with spans.
struct Table<'t, 'i> {
    entries: Vec<(&'t str, Span, &'t Item<'i>)>,
    span: Span,
}

impl<'t, 'i> Table<'t, 'i> {
    fn new(t: &'t DeTable<'i>, span: Span) -> Self {
        Table {
            entries: t
                .iter()
                .map(|(k, v)| (k.get_ref().as_ref(), k.span(), v))
                .collect(),
            span,
        }
    }

    fn get(&self, key: &str) -> Option<&'t Item<'i>> {
        self.entries.iter().find(|(k, _, _)| *k == key).map(|e| e.2)
    }

    fn key_span(&self, key: &str) -> Option<Span> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|e| e.1.clone())
    }
}

impl Parser<'_, '_> {
    fn err(&mut self, span: &Span, msg: impl Into<String>) {
        self.r.at(span, msg);
    }

    fn check_keys(&mut self, t: &Table<'_, '_>, allowed: &[&str], what: &str) {
        for (k, span, _) in &t.entries {
            if !allowed.contains(k) {
                let hint = match did_you_mean(k, allowed) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("allowed keys are {}", allowed.join(", ")),
                };
                self.err(span, format!("unknown key `{k}` in {what}: {hint}"));
            }
        }
    }

    fn table<'t, 'i>(&mut self, item: &'t Item<'i>, what: &str) -> Option<Table<'t, 'i>> {
        match item.get_ref() {
            DeValue::Table(t) => Some(Table::new(t, item.span())),
            _ => {
                self.err(&item.span(), format!("{what} must be a table"));
                None
            }
        }
    }

    fn tables<'t, 'i>(&mut self, item: &'t Item<'i>, what: &str) -> Vec<Table<'t, 'i>> {
        match item.get_ref() {
            DeValue::Array(a) => a.iter().filter_map(|i| self.table(i, what)).collect(),
            _ => {
                self.err(
                    &item.span(),
                    format!("{what} must be an array of tables: write `[[{what}]]` sections"),
                );
                vec![]
            }
        }
    }

    fn string<'t>(&mut self, item: &'t Item<'_>, key: &str) -> Option<&'t str> {
        match item.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            _ => {
                self.err(
                    &item.span(),
                    format!("`{key}` must be a quoted string, such as `{key} = \"...\"`"),
                );
                None
            }
        }
    }

    fn integer(&mut self, item: &Item<'_>, key: &str) -> Option<i64> {
        match item.get_ref() {
            DeValue::Integer(i) => {
                let digits = i.as_str().replace('_', "");
                let parsed = i64::from_str_radix(
                    digits
                        .trim_start_matches("0x")
                        .trim_start_matches("0o")
                        .trim_start_matches("0b"),
                    i.radix(),
                );
                match parsed {
                    Ok(v) => Some(v),
                    Err(_) => {
                        self.err(&item.span(), format!("`{key}` is out of range"));
                        None
                    }
                }
            }
            _ => {
                self.err(&item.span(), format!("`{key}` must be a whole number"));
                None
            }
        }
    }

    fn number(&mut self, item: &Item<'_>, key: &str) -> Option<f64> {
        match item.get_ref() {
            DeValue::Float(f) => match f.as_str().replace('_', "").parse::<f64>() {
                Ok(v) if v.is_finite() => Some(v),
                _ => {
                    self.err(&item.span(), format!("`{key}` must be a finite number"));
                    None
                }
            },
            DeValue::Integer(_) => self.integer(item, key).map(|i| i as f64),
            _ => {
                self.err(&item.span(), format!("`{key}` must be a number"));
                None
            }
        }
    }

    fn name(&mut self, t: &Table<'_, '_>, what: &str) -> Option<(String, Span)> {
        let Some(item) = t.get("name") else {
            self.err(
                &t.span,
                format!("{what} has no `name`: add `name = \"...\"`"),
            );
            return None;
        };
        let name = self.string(item, "name")?;
        let ok = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            self.err(
                &item.span(),
                format!(
                    "name `{name}` is not allowed: use lowercase letters, digits and `_`, starting with a letter"
                ),
            );
            return None;
        }
        Some((name.to_string(), item.span()))
    }

    fn duration(&mut self, t: &Table<'_, '_>, key: &str) -> Option<(Duration, Span)> {
        let item = t.get(key)?;
        let text = self.string(item, key)?;
        match Duration::parse(text) {
            Ok(d) if d.as_ms() > 0 => Some((d, item.span())),
            Ok(_) => {
                self.err(&item.span(), format!("`{key}` must be longer than zero"));
                None
            }
            Err(msg) => {
                self.err(&item.span(), format!("`{key}`: {msg}"));
                None
            }
        }
    }

    fn spec(&mut self, root: &DeTable<'_>) -> Spec {
        let top = Table::new(root, 0..0);
        self.check_keys(&top, TOP_KEYS, "the spec's top level");
        let version = match top.get("version") {
            Some(item) => match self.integer(item, "version") {
                Some(v) if v >= 1 && v <= u32::MAX as i64 => v as u32,
                Some(_) => {
                    self.err(&item.span(), "`version` must be a positive whole number");
                    1
                }
                None => 1,
            },
            None => 1,
        };
        let mut entities: Vec<Entity> = Vec::new();
        let mut entity_spans: HashMap<String, Span> = HashMap::new();
        if let Some(item) = top.get("entity") {
            for t in self.tables(item, "entity") {
                self.check_keys(&t, ENTITY_KEYS, "an [[entity]]");
                let Some((name, span)) = self.name(&t, "an [[entity]]") else {
                    continue;
                };
                if let Some(prev) = entity_spans.get(&name) {
                    let (line, _) = crate::diagnostic::line_col(self.r_text(), prev.start);
                    self.err(
                        &span,
                        format!(
                            "entity `{name}` is already defined on line {line}: remove one of them"
                        ),
                    );
                    continue;
                }
                let join_key = match t.get("join_key") {
                    Some(item) => match self.string(item, "join_key") {
                        Some(k) => match Field::from_name(k) {
                            Some(f) if f.ty() == Type::Text => Some(f),
                            _ => {
                                self.err(
                                    &item.span(),
                                    format!(
                                        "unknown join key `{k}`: it must be a text field of the events ({})",
                                        text_fields()
                                    ),
                                );
                                None
                            }
                        },
                        None => None,
                    },
                    None => {
                        self.err(
                            &t.span,
                            format!(
                                "entity `{name}` has no `join_key`: add `join_key = \"user_id\"`"
                            ),
                        );
                        None
                    }
                };
                if let Some(join_key) = join_key {
                    entity_spans.insert(name.clone(), span);
                    entities.push(Entity { name, join_key });
                }
            }
        }
        let mut views = Vec::new();
        let mut feature_spans: HashMap<String, Span> = HashMap::new();
        let mut view_spans: HashMap<String, Span> = HashMap::new();
        match top.get("view") {
            Some(item) => {
                for t in self.tables(item, "view") {
                    if let Some(v) = self.view(&t, &entities, &mut feature_spans) {
                        if let Some(prev) = view_spans.get(&v.name) {
                            let (line, _) = crate::diagnostic::line_col(self.r_text(), prev.start);
                            let span = t.get("name").map_or(t.span.clone(), |i| i.span());
                            self.err(
                                &span,
                                format!("view `{}` is already defined on line {line}: rename one of them", v.name),
                            );
                            continue;
                        }
                        view_spans.insert(
                            v.name.clone(),
                            t.get("name").map_or(t.span.clone(), |i| i.span()),
                        );
                        views.push(v);
                    }
                }
            }
            None => self.r.at_offset(
                0,
                "the spec has no views: add a `[[view]]` section with at least one `[[view.feature]]`",
            ),
        }
        Spec {
            version,
            entities,
            views,
        }
    }

    fn r_text(&self) -> &str {
        self.r.text()
    }

    fn view(
        &mut self,
        t: &Table<'_, '_>,
        entities: &[Entity],
        feature_spans: &mut HashMap<String, Span>,
    ) -> Option<View> {
        self.check_keys(t, VIEW_KEYS, "a [[view]]");
        let (name, _) = self.name(t, "a [[view]]")?;
        let entity = match t.get("entity") {
            Some(item) => {
                let e = self.string(item, "entity")?;
                match entities.iter().find(|x| x.name == e) {
                    Some(x) => x.clone(),
                    None => {
                        let names: Vec<&str> = entities.iter().map(|x| x.name.as_str()).collect();
                        let hint = match did_you_mean(e, &names) {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => "declare it in an [[entity]] section".to_string(),
                        };
                        self.err(
                            &item.span(),
                            format!("view `{name}` uses unknown entity `{e}`: {hint}"),
                        );
                        return None;
                    }
                }
            }
            None => {
                self.err(
                    &t.span,
                    format!("view `{name}` has no `entity`: add `entity = \"...\"`"),
                );
                return None;
            }
        };
        let layer = match t.get("layer") {
            Some(item) => match self.string(item, "layer")? {
                "batch" => Layer::Batch,
                "streaming" => Layer::Streaming,
                other => {
                    let hint = did_you_mean(other, &["batch", "streaming"])
                        .map_or(String::new(), |s| format!(" (did you mean `{s}`?)"));
                    self.err(
                        &item.span(),
                        format!("unknown layer `{other}`{hint}: use `batch` or `streaming`"),
                    );
                    return None;
                }
            },
            None => {
                self.err(&t.span, format!("view `{name}` has no `layer`: add `layer = \"batch\"` or `layer = \"streaming\"`"));
                return None;
            }
        };
        let ttl = self.duration(t, "ttl");
        let cadence = self.duration(t, "cadence");
        let lateness = self.duration(t, "allowed_lateness");
        let history = self.duration(t, "history");
        match layer {
            Layer::Streaming => {
                for key in ["ttl", "cadence"] {
                    if let Some(span) = t.key_span(key) {
                        self.err(&span, format!("`{key}` applies to batch views only: a streaming view is always fresh; remove it (a `last` feature takes its own `ttl`)"));
                    }
                }
            }
            Layer::Batch => {
                for key in ["allowed_lateness", "history"] {
                    if let Some(span) = t.key_span(key) {
                        self.err(
                            &span,
                            format!("`{key}` applies to streaming views only: remove it"),
                        );
                    }
                }
            }
        }
        let cadence_d = cadence.as_ref().map_or(DEFAULT_CADENCE, |c| c.0);
        let mut features = Vec::new();
        match t.get("feature") {
            Some(item) => {
                for ft in self.tables(item, "view.feature") {
                    let ctx = ViewCtx {
                        layer,
                        cadence: cadence_d,
                    };
                    if let Some(f) = self.feature(&ft, &ctx) {
                        let span = ft.get("name").map_or(ft.span.clone(), |i| i.span());
                        if let Some(prev) = feature_spans.get(&f.name) {
                            let (line, col) =
                                crate::diagnostic::line_col(self.r_text(), prev.start);
                            self.err(
                                &span,
                                format!(
                                    "duplicate feature name `{}` (first defined at line {line}, column {col}): rename it, or give both a distinct `version`",
                                    f.name
                                ),
                            );
                            continue;
                        }
                        feature_spans.insert(f.name.clone(), span);
                        features.push(f);
                    }
                }
            }
            None => self.err(
                &t.span,
                format!("view `{name}` has no features: add `[[view.feature]]` sections"),
            ),
        }
        if let (Some((ttl_d, ttl_span)), Layer::Batch) = (&ttl, layer) {
            let coarsest = features
                .iter()
                .filter_map(|f: &Feature| match f.extent {
                    Extent::Sliding { resolution, .. } => Some((resolution, f.name.as_str())),
                    _ => None,
                })
                .max_by_key(|(r, _)| *r);
            match coarsest {
                Some((r, feature)) if *ttl_d < r => self.err(
                    ttl_span,
                    format!("ttl {ttl_d} is shorter than the resolution {r} of feature `{feature}`: values would expire before their tile is complete; make the ttl at least {r}"),
                ),
                _ if *ttl_d < cadence_d => self.err(
                    ttl_span,
                    format!("ttl {ttl_d} is shorter than the cadence {cadence_d}: every snapshot would go stale before the next one; make the ttl at least {cadence_d}"),
                ),
                _ => {}
            }
        }
        Some(View {
            name,
            entity: entity.name,
            join_key: entity.join_key,
            layer,
            ttl: ttl.map(|t| t.0),
            cadence: cadence_d,
            allowed_lateness: lateness.map_or(DEFAULT_LATENESS, |l| l.0),
            history: history.map_or(Duration::from_ms(0), |h| h.0),
            features,
        })
    }

    fn feature(&mut self, t: &Table<'_, '_>, view: &ViewCtx) -> Option<Feature> {
        self.check_keys(t, FEATURE_KEYS, "a [[view.feature]]");
        let (base_name, _) = self.name(t, "a [[view.feature]]")?;
        let version = match t.get("version") {
            Some(item) => match self.integer(item, "version")? {
                v if v >= 1 && v <= u32::MAX as i64 => Some(v as u32),
                _ => {
                    self.err(
                        &item.span(),
                        "`version` must be a positive whole number, such as `version = 2`",
                    );
                    return None;
                }
            },
            None => None,
        };
        let name = match version {
            Some(v) => format!("{base_name}_v{v}"),
            None => base_name.clone(),
        };
        let Some(agg_item) = t.get("aggregation") else {
            self.err(
                &t.span,
                format!(
                    "feature `{name}` has no `aggregation`: add one of {}",
                    AGGREGATIONS.join(", ")
                ),
            );
            return None;
        };
        let agg_name = self.string(agg_item, "aggregation")?;
        if !AGGREGATIONS.contains(&agg_name) {
            let hint = did_you_mean(agg_name, AGGREGATIONS)
                .map_or(String::new(), |s| format!("did you mean `{s}`? "));
            self.err(
                &agg_item.span(),
                format!(
                    "unknown aggregation `{agg_name}`: {hint}use one of {}",
                    AGGREGATIONS.join(", ")
                ),
            );
            return None;
        }
        let batch_only = matches!(agg_name, "pct_rank" | "age");
        if batch_only && view.layer == Layer::Streaming {
            self.err(
                &agg_item.span(),
                format!("`{agg_name}` is a batch-only aggregation ({}), so streaming feature `{name}` cannot use it: move the feature to a batch view",
                    if agg_name == "pct_rank" { "it ranks the whole population" } else { "it needs all of an entity's history" }),
            );
            return None;
        }
        for (key, allowed_for) in [
            ("numerator", "ratio"),
            ("denominator", "ratio"),
            ("of", "pct_rank"),
            ("round", "pct_rank"),
            ("unit", "age"),
        ] {
            if let Some(span) = t.key_span(key)
                && agg_name != allowed_for
            {
                self.err(
                    &span,
                    format!("`{key}` applies to `{allowed_for}` features only: remove it"),
                );
            }
        }
        let extent = self.extent(t, &name, agg_name, view)?;
        let aggregation = match agg_name {
            "ratio" => {
                for key in ["value", "where"] {
                    if let Some(span) = t.key_span(key) {
                        self.err(&span, format!("a ratio takes `{key}` inside its `numerator` and `denominator`: move it there"));
                    }
                }
                let numerator = self.inner_measure(t, "numerator", &name)?;
                let denominator = self.inner_measure(t, "denominator", &name)?;
                Aggregation::Ratio {
                    numerator,
                    denominator,
                }
            }
            "pct_rank" => {
                for key in ["value", "where"] {
                    if let Some(span) = t.key_span(key) {
                        self.err(
                            &span,
                            format!("`pct_rank` ranks the measure in `of`: move `{key}` into `of`"),
                        );
                    }
                }
                let of = self.inner_measure(t, "of", &name)?;
                let round = match t.get("round") {
                    Some(item) => match self.integer(item, "round")? {
                        r @ 0..=9 => Some(r as u32),
                        _ => {
                            self.err(
                                &item.span(),
                                "`round` is a number of decimal places between 0 and 9",
                            );
                            return None;
                        }
                    },
                    None => None,
                };
                Aggregation::PctRank { of, round }
            }
            "age" => {
                if let Some(span) = t.key_span("value") {
                    self.err(&span, "`age` counts from the earliest matching event and takes no `value`: remove it");
                }
                let filter = self.filter(t)?;
                let unit = match self.duration(t, "unit") {
                    Some((u, _)) => u,
                    None if t.get("unit").is_some() => return None,
                    None => {
                        self.err(
                            &t.span,
                            format!("feature `{name}` has no `unit`: add `unit = \"1d\"`"),
                        );
                        return None;
                    }
                };
                Aggregation::Age { filter, unit }
            }
            _ => {
                let agg = primitive(agg_name);
                if agg == Agg::Duration
                    && let Some(span) = t.key_span("where")
                {
                    self.err(
                        &span,
                        "`duration` measures the whole session and takes no `where`: remove it",
                    );
                }
                if agg == Agg::CountDistinct && matches!(extent, Extent::Session { .. }) {
                    self.err(
                        &agg_item.span(),
                        "`count_distinct` is not available over sessions: use a sliding `window`",
                    );
                    return None;
                }
                Aggregation::Measure(self.measure(t, agg, &name)?)
            }
        };
        let value_type = match &aggregation {
            Aggregation::Measure(m) => m.agg.value_type(),
            Aggregation::Age { .. } => ValueType::Int,
            Aggregation::Ratio { .. } | Aggregation::PctRank { .. } => ValueType::Float,
        };
        let natural_default = match &aggregation {
            Aggregation::Measure(m) => match m.agg {
                Agg::Count | Agg::CountDistinct => Value::Int(0),
                Agg::Sum | Agg::Duration => Value::Float(0.0),
                _ => Value::Null,
            },
            _ => Value::Null,
        };
        let default = match t.get("default") {
            Some(item) => self.default_value(item, value_type)?,
            None => natural_default,
        };
        let tolerance = match t.get("tolerance") {
            Some(item) => self.tolerance(item)?,
            None if value_type == ValueType::Int => Tolerance::EXACT,
            None => Tolerance {
                absolute: 0.0,
                relative: 1e-9,
            },
        };
        Some(Feature {
            name,
            base_name,
            version,
            aggregation,
            extent,
            value_type,
            default,
            tolerance,
        })
    }

    fn extent(
        &mut self,
        t: &Table<'_, '_>,
        name: &str,
        agg: &str,
        view: &ViewCtx,
    ) -> Option<Extent> {
        let window = self.duration(t, "window");
        let resolution = self.duration(t, "resolution");
        let gap = self.duration(t, "session_gap");
        let ttl = self.duration(t, "ttl");
        for key in ["window", "resolution", "session_gap", "ttl"] {
            if t.get(key).is_some()
                && match key {
                    "window" => window.is_none(),
                    "resolution" => resolution.is_none(),
                    "session_gap" => gap.is_none(),
                    _ => ttl.is_none(),
                }
            {
                return None;
            }
        }
        if let (Some(_), Some((_, span))) = (&gap, window.as_ref().or(ttl.as_ref())) {
            self.err(span, format!("feature `{name}` has a `session_gap`, so it covers the current session: remove the `window`/`ttl`"));
            return None;
        }
        if let Some((_, span)) = &ttl {
            if agg != "last" {
                self.err(span, format!("`ttl` applies to `last` features only; for `{agg}` use a `window` and `resolution`"));
                return None;
            }
            if let Some((_, wspan)) = &window {
                self.err(
                    wspan,
                    "a `last` feature takes either a `ttl` or a `window`, not both: remove one",
                );
                return None;
            }
        }
        if agg == "duration" && gap.is_none() {
            self.err(
                &t.span,
                format!(
                    "`duration` measures a session: add `session_gap = \"30m\"` to feature `{name}`"
                ),
            );
            return None;
        }
        let extent = match (window, resolution, gap, ttl) {
            (Some((w, wspan)), Some((r, rspan)), None, None) => {
                if !w.is_multiple_of(r) {
                    let up = Duration::from_ms((w.as_ms() / r.as_ms() + 1) * r.as_ms());
                    self.err(
                        &wspan,
                        format!("window {w} is not a multiple of its resolution {r}: make the window a whole number of resolutions (such as {up}) or choose a resolution that divides it"),
                    );
                    return None;
                }
                if view.layer == Layer::Batch && !view.cadence.is_multiple_of(r) {
                    self.err(
                        &rspan,
                        format!("resolution {r} does not divide the view's cadence {}: snapshots must fall on tile boundaries; choose a resolution that divides {}", view.cadence, view.cadence),
                    );
                    return None;
                }
                Extent::Sliding {
                    window: w,
                    resolution: r,
                }
            }
            (Some((_, span)), None, None, None) => {
                self.err(&span, format!("feature `{name}` has a `window` but no `resolution`: add one that divides the window, such as `resolution = \"1m\"`"));
                return None;
            }
            (None, Some((_, span)), None, None) => {
                self.err(&span, format!("feature `{name}` has a `resolution` but no `window`: add `window`, or remove the resolution to cover all history"));
                return None;
            }
            (None, Some((_, span)), Some(_), None) | (None, Some((_, span)), None, Some(_)) => {
                self.err(&span, "`resolution` belongs with a `window`: remove it");
                return None;
            }
            (None, None, Some((g, gspan)), None) => {
                if view.layer == Layer::Batch {
                    self.err(&gspan, format!("session windows are evaluated at request time, so batch feature `{name}` cannot use one: move it to a streaming view"));
                    return None;
                }
                Extent::Session { gap: g }
            }
            (None, None, None, Some((ttl, _))) => Extent::Recent { ttl },
            (None, None, None, None) => {
                if view.layer == Layer::Streaming {
                    let span = t.get("name").map_or(t.span.clone(), |i| i.span());
                    self.err(&span, format!("streaming feature `{name}` covers all history, so its state would grow forever: give it a `window` and `resolution`, a `session_gap`, or (for `last`) a `ttl`"));
                    return None;
                }
                Extent::AllHistory
            }
            _ => return None,
        };
        if agg == "age" && !matches!(extent, Extent::AllHistory) {
            self.err(&t.span, format!("`age` counts from the entity's first event ever: remove the window from feature `{name}`"));
            return None;
        }
        if agg == "pct_rank" && matches!(extent, Extent::Session { .. }) {
            return None;
        }
        Some(extent)
    }

    fn measure(&mut self, t: &Table<'_, '_>, agg: Agg, name: &str) -> Option<Measure> {
        let filter = self.filter(t)?;
        let value = match (agg.needs_value(), t.get("value")) {
            (true, Some(item)) => {
                let v = self.value_expr(item, agg)?;
                Some(v)
            }
            (true, None) => {
                self.err(&t.span, format!("feature `{name}` uses `{}` and needs a `value`, such as `value = \"amount\"`", agg.name()));
                return None;
            }
            (false, Some(item)) => {
                self.err(
                    &item.span(),
                    format!("`{}` takes no `value`: remove it", agg.name()),
                );
                return None;
            }
            (false, None) => None,
        };
        Some(Measure { agg, filter, value })
    }

    fn inner_measure(&mut self, t: &Table<'_, '_>, key: &str, name: &str) -> Option<Measure> {
        let Some(item) = t.get(key) else {
            self.err(&t.span, format!("feature `{name}` needs `{key} = {{ aggregation = \"count\", where = {{ event_type = [\"...\"] }} }}`"));
            return None;
        };
        let inner = self.table(item, &format!("`{key}`"))?;
        self.check_keys(&inner, MEASURE_KEYS, &format!("`{key}`"));
        let Some(agg_item) = inner.get("aggregation") else {
            self.err(
                &item.span(),
                format!(
                    "`{key}` has no `aggregation`: add one of {}",
                    INNER_AGGREGATIONS.join(", ")
                ),
            );
            return None;
        };
        let agg_name = self.string(agg_item, "aggregation")?;
        if !INNER_AGGREGATIONS.contains(&agg_name) {
            let hint = did_you_mean(agg_name, INNER_AGGREGATIONS)
                .map_or(String::new(), |s| format!("did you mean `{s}`? "));
            self.err(
                &agg_item.span(),
                format!(
                    "unknown aggregation `{agg_name}` in `{key}`: {hint}use one of {}",
                    INNER_AGGREGATIONS.join(", ")
                ),
            );
            return None;
        }
        self.measure(&inner, primitive(agg_name), name)
    }

    fn filter(&mut self, t: &Table<'_, '_>) -> Option<Filter> {
        let Some(item) = t.get("where") else {
            return Some(Filter::default());
        };
        let wt = self.table(item, "`where`")?;
        let mut conditions = Vec::new();
        for (key, kspan, v) in &wt.entries {
            let field = match Field::from_name(key) {
                Some(f) if f.ty() == Type::Text => f,
                _ => {
                    self.err(kspan, format!("`where` cannot test `{key}`: it tests text fields ({}), such as `where = {{ event_type = [\"purchase\"] }}`", text_fields()));
                    return None;
                }
            };
            let values = match v.get_ref() {
                DeValue::String(s) => vec![s.to_string()],
                DeValue::Array(a) if !a.is_empty() => {
                    let mut out = Vec::new();
                    for x in a.iter() {
                        out.push(self.string(x, key)?.to_string());
                    }
                    out
                }
                _ => {
                    self.err(&v.span(), format!("`where.{key}` must be a non-empty list of strings, such as `[\"purchase\", \"refund\"]`"));
                    return None;
                }
            };
            conditions.push((field, values));
        }
        Some(Filter::new(conditions))
    }

    fn value_expr(&mut self, item: &Item<'_>, agg: Agg) -> Option<Expr> {
        let text = self.string(item, "value")?;
        match Expr::parse(text) {
            Ok(e) => {
                let ty = e.ty().unwrap_or(Type::Number);
                let ok = match agg {
                    Agg::CountDistinct => ty != Type::Timestamp,
                    _ => ty == Type::Number,
                };
                if !ok {
                    self.err(
                        &item.span(),
                        format!(
                            "`{}` needs a {} value, but `{text}` is {ty}{}",
                            agg.name(),
                            if agg == Agg::CountDistinct {
                                "number or text"
                            } else {
                                "numeric"
                            },
                            if ty == Type::Timestamp {
                                ": use `utc_date(ts)` or `utc_hour(ts)`"
                            } else {
                                ""
                            },
                        ),
                    );
                    return None;
                }
                Some(e)
            }
            Err(e) => {
                // +1 skips the opening quote of the TOML string.
                self.r.at_offset(
                    item.span().start + 1 + e.offset,
                    format!("in `value`: {}", e.message),
                );
                None
            }
        }
    }

    fn default_value(&mut self, item: &Item<'_>, ty: ValueType) -> Option<Value> {
        match (item.get_ref(), ty) {
            (DeValue::String(s), _) if s.as_ref() == "null" => Some(Value::Null),
            (DeValue::Integer(_), ValueType::Int) => self.integer(item, "default").map(Value::Int),
            (DeValue::Integer(_) | DeValue::Float(_), ValueType::Float) => {
                self.number(item, "default").map(Value::Float)
            }
            (DeValue::Float(_), ValueType::Int) => {
                self.err(
                    &item.span(),
                    "this feature is an integer: its `default` must be a whole number or \"null\"",
                );
                None
            }
            _ => {
                self.err(&item.span(), "`default` must be a number or \"null\"");
                None
            }
        }
    }

    fn tolerance(&mut self, item: &Item<'_>) -> Option<Tolerance> {
        if let DeValue::String(s) = item.get_ref() {
            if s.as_ref() == "exact" {
                return Some(Tolerance::EXACT);
            }
            self.err(
                &item.span(),
                "`tolerance` must be \"exact\" or a table such as `{ relative = 1e-9 }`",
            );
            return None;
        }
        let t = self.table(item, "`tolerance`")?;
        self.check_keys(&t, &["absolute", "relative"], "`tolerance`");
        let mut tol = Tolerance::EXACT;
        for (key, _, v) in &t.entries {
            let x = self.number(v, key)?;
            if x < 0.0 {
                self.err(&v.span(), format!("`tolerance.{key}` cannot be negative"));
                return None;
            }
            match *key {
                "absolute" => tol.absolute = x,
                "relative" => tol.relative = x,
                _ => {}
            }
        }
        Some(tol)
    }
}

struct ViewCtx {
    layer: Layer,
    cadence: Duration,
}

fn primitive(name: &str) -> Agg {
    match name {
        "count" => Agg::Count,
        "sum" => Agg::Sum,
        "mean" => Agg::Mean,
        "min" => Agg::Min,
        "max" => Agg::Max,
        "count_distinct" => Agg::CountDistinct,
        "last" => Agg::Last,
        "duration" => Agg::Duration,
        other => unreachable!("`{other}` is not a primitive aggregation"),
    }
}

fn text_fields() -> String {
    Field::ALL
        .iter()
        .filter(|f| f.ty() == Type::Text)
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(", ")
}
