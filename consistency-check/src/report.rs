//! The report: JSON for machines, one self-contained HTML page for people (tables, a chart of
//! mismatch rates, the trend over earlier reports, drill-down examples).

use std::fmt::Write;
use std::path::Path;

use duet_batch::store::Location;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;

use crate::stats::FeatureStats;
use crate::{Error, Report, TrendPoint};

const REPORTS: &str = "reports";

/// Earlier reports' per-feature mismatch rates, oldest first (at most 30).
pub async fn previous_reports(store: &Location) -> Vec<TrendPoint> {
    let prefix = store.child(REPORTS);
    let Ok(files) = store
        .store
        .list(Some(&prefix))
        .try_collect::<Vec<_>>()
        .await
    else {
        return vec![];
    };
    let mut points = Vec::new();
    for f in files {
        let Ok(r) = store.store.get(&f.location).await else {
            continue;
        };
        let Ok(bytes) = r.bytes().await else { continue };
        if let Ok(report) = serde_json::from_slice::<Report>(&bytes) {
            points.push(point(&report));
        }
    }
    points.sort_by(|a, b| a.as_of.cmp(&b.as_of));
    let skip = points.len().saturating_sub(30);
    points.split_off(skip)
}

fn point(r: &Report) -> TrendPoint {
    let mut rates = std::collections::BTreeMap::new();
    for f in r.state.features.iter().chain(&r.served.features) {
        let key = format!("{}:{}", f.view, f.feature);
        let e = rates.entry(key).or_insert(0.0f64);
        *e = e.max(f.mismatch_rate);
    }
    TrendPoint {
        as_of: r.as_of.clone(),
        rates,
    }
}

/// Writes `report.json` and `report.html` into `dir`, and keeps the JSON in the store for
/// later trends.
pub async fn write(report: &Report, dir: &Path, store: &Location) -> Result<(), Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::BadInput(format!("--report {}: {e}", dir.display())))?;
    let json = serde_json::to_string_pretty(report).expect("serializable");
    std::fs::write(dir.join("report.json"), &json)
        .map_err(|e| Error::Read(format!("cannot write {}: {e}", dir.display())))?;
    std::fs::write(dir.join("report.html"), html(report))
        .map_err(|e| Error::Read(format!("cannot write {}: {e}", dir.display())))?;
    let key = format!(
        "{REPORTS}/{}.json",
        duet_batch::publish::as_of_key(report.as_of_ms)
    );
    store
        .store
        .put(&store.child(&key), json.into())
        .await
        .map_err(|e| Error::Read(format!("cannot keep the report in {}: {e}", store.url)))?;
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn table(out: &mut String, title: &str, description: &str, items: u64, features: &[FeatureStats]) {
    let _ = writeln!(
        out,
        "<h2>{}</h2><p>{} &middot; {items} compared</p>",
        esc(title),
        esc(description)
    );
    if features.is_empty() {
        out.push_str("<p><em>nothing to compare</em></p>");
        return;
    }
    out.push_str("<table><tr><th>feature</th><th>compared</th><th>mismatches</th><th>rate</th><th>missing</th><th>extra</th><th>mean |diff|</th><th>max |diff|</th><th>SMAPE %</th><th>causes</th><th></th></tr>");
    for f in features {
        let causes: Vec<String> = f
            .causes
            .iter()
            .map(|(k, v)| format!("{} {v}", esc(k)))
            .collect();
        let _ = write!(
            out,
            "<tr class=\"{}\"><td>{}:{}</td><td>{}</td><td>{}</td><td>{:.4}%</td><td>{}</td><td>{}</td><td>{:.6}</td><td>{:.6}</td><td>{:.4}</td><td>{}</td><td>{}</td></tr>",
            if f.ok { "ok" } else { "bad" },
            esc(&f.view),
            esc(&f.feature),
            f.compared,
            f.mismatches,
            100.0 * f.mismatch_rate,
            f.missing,
            f.extra,
            f.mean_abs_diff,
            f.max_abs_diff,
            f.smape,
            causes.join(", "),
            if f.ok { "&#10003;" } else { "&#10007;" }
        );
        if !f.examples.is_empty() {
            let _ = write!(
                out,
                "<tr><td colspan=\"11\"><details><summary>{} examples</summary><table class=\"ex\"><tr><th>entity</th><th>as of</th><th>actual</th><th>expected</th><th>cause</th></tr>",
                f.examples.len()
            );
            for e in &f.examples {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&e.entity),
                    esc(&e.as_of),
                    e.actual,
                    e.expected,
                    esc(&e.cause)
                );
            }
            out.push_str("</table></details></td></tr>");
        }
    }
    out.push_str("</table>");
}

fn bar_chart(out: &mut String, features: &[&FeatureStats]) {
    let w = 720.0;
    let row = 18.0;
    let h = row * features.len() as f64 + 30.0;
    let max = features
        .iter()
        .map(|f| f.mismatch_rate)
        .fold(0.0f64, f64::max)
        .max(1e-6);
    let _ = write!(
        out,
        "<svg width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"mismatch rate per feature\">"
    );
    for (i, f) in features.iter().enumerate() {
        let y = 10.0 + row * i as f64;
        let len = 380.0 * f.mismatch_rate / max;
        let _ = write!(
            out,
            "<text x=\"0\" y=\"{}\" font-size=\"11\">{}:{}</text><rect x=\"300\" y=\"{}\" width=\"{len:.1}\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"11\">{:.3}%</text>",
            y + 10.0,
            esc(&f.view),
            esc(&f.feature),
            y,
            if f.ok { "#4a8" } else { "#d44" },
            305.0 + len,
            y + 10.0,
            100.0 * f.mismatch_rate
        );
    }
    out.push_str("</svg>");
}

fn trend_chart(out: &mut String, report: &Report) {
    let mut points = report.trend.clone();
    if points.last().is_none_or(|p| p.as_of != report.as_of) {
        points.push(point(report));
    }
    if points.len() < 2 {
        out.push_str("<p><em>The trend appears once earlier reports exist in the store.</em></p>");
        return;
    }
    let (w, h) = (720.0, 200.0);
    let max = points
        .iter()
        .flat_map(|p| p.rates.values())
        .fold(0.0f64, |a, b| a.max(*b))
        .max(1e-6);
    let features: std::collections::BTreeSet<&String> =
        points.iter().flat_map(|p| p.rates.keys()).collect();
    let _ = write!(
        out,
        "<svg width=\"{w}\" height=\"{}\" role=\"img\" aria-label=\"mismatch rate trend\"><rect x=\"40\" y=\"10\" width=\"660\" height=\"{h}\" fill=\"none\" stroke=\"#ccc\"/>",
        h + 40.0
    );
    let palette = [
        "#d44", "#48c", "#4a8", "#c84", "#84c", "#888", "#c48", "#4cc",
    ];
    for (k, name) in features.iter().enumerate() {
        let pts: Vec<String> = points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let x = 40.0 + 660.0 * i as f64 / (points.len() - 1) as f64;
                let y = 10.0 + h - h * p.rates.get(*name).copied().unwrap_or(0.0) / max;
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = write!(
            out,
            "<polyline fill=\"none\" stroke=\"{}\" points=\"{}\"><title>{}</title></polyline>",
            palette[k % palette.len()],
            pts.join(" "),
            esc(name)
        );
    }
    let _ = write!(
        out,
        "<text x=\"40\" y=\"{}\" font-size=\"11\">{}</text><text x=\"600\" y=\"{}\" font-size=\"11\">{}</text>",
        h + 30.0,
        esc(&points[0].as_of),
        h + 30.0,
        esc(&points[points.len() - 1].as_of)
    );
    out.push_str("</svg>");
}

/// The self-contained HTML page.
pub fn html(r: &Report) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>duet consistency report {}</title><style>\
         body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}\
         td,th{{border:1px solid #ddd;padding:3px 8px;font-size:13px;text-align:right}} td:first-child,th:first-child{{text-align:left}}\
         tr.bad td{{background:#fdecec}} .verdict{{font-size:20px;font-weight:bold}} .pass{{color:#283}} .fail{{color:#c22}}\
         table.ex td{{text-align:left}}</style></head><body>",
        esc(&r.as_of)
    );
    let _ = write!(
        out,
        "<h1>duet consistency report</h1><p class=\"verdict {}\">{}</p><p>as of {} &middot; generated {} &middot; allowed mismatch rate {:.4}% &middot; Kafka compared: {}</p>",
        if r.ok { "pass" } else { "fail" },
        if r.ok {
            "PASS: every feature agrees within its tolerance"
        } else {
            "FAIL: some features break their tolerance"
        },
        esc(&r.as_of),
        esc(&r.generated_at),
        100.0 * r.max_mismatch_rate,
        if r.kafka_compared { "yes" } else { "no" }
    );
    out.push_str("<h2>Mismatch rate per feature</h2>");
    let all: Vec<&FeatureStats> = r.state.features.iter().chain(&r.served.features).collect();
    bar_chart(&mut out, &all);
    out.push_str("<h2>Trend</h2>");
    trend_chart(&mut out, r);
    table(
        &mut out,
        "Speed layer state",
        &r.state.description,
        r.state.items,
        &r.state.features,
    );
    table(
        &mut out,
        "Served features",
        &r.served.description,
        r.served.items,
        &r.served.features,
    );
    out.push_str("<h2>Speed layer counters</h2><table>");
    for (k, v) in &r.speed_counters {
        let _ = write!(out, "<tr><td>{}</td><td>{v}</td></tr>", esc(k));
    }
    out.push_str("</table></body></html>\n");
    out
}
