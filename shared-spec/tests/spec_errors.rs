//! Every kind of bad spec is refused with its location and a sentence saying how to fix it.

use duet_spec::{CATALOG, parse_spec};

fn first_error(text: &str) -> (usize, usize, String) {
    let errs = parse_spec("bad.toml", text).expect_err("the spec must be refused");
    let d = errs.first().clone();
    assert_eq!(d.file, "bad.toml");
    (d.line, d.col, d.message)
}

const HEAD: &str = r#"[[entity]]
name = "user"
join_key = "user_id"
"#;

fn with_feature(view_extra: &str, feature: &str) -> String {
    format!(
        "{HEAD}\n[[view]]\nname = \"v\"\nentity = \"user\"\n{view_extra}\n\n[[view.feature]]\n{feature}\n"
    )
}

#[test]
fn the_catalog_is_valid() {
    let spec = parse_spec("catalog.toml", CATALOG).unwrap();
    assert_eq!(spec.features().count(), 14);
}

#[test]
fn toml_syntax_error() {
    let (line, col, msg) = first_error("[[entity]]\nname = \"user\njoin_key = \"user_id\"\n");
    assert_eq!(line, 2);
    assert!(col >= 8, "col {col}");
    assert!(msg.starts_with("TOML syntax error"), "{msg}");
}

#[test]
fn unknown_key_suggests_the_right_one() {
    let text = with_feature(
        "layer = \"batch\"",
        "name = \"c\"\naggregation = \"count\"\nwindw = \"30d\"\nresolution = \"1d\"",
    );
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (13, 1));
    assert_eq!(
        msg,
        "unknown key `windw` in a [[view.feature]]: did you mean `window`?"
    );
}

#[test]
fn unknown_aggregation() {
    let text = with_feature("layer = \"batch\"", "name = \"c\"\naggregation = \"cnt\"");
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (12, 15));
    assert!(
        msg.starts_with("unknown aggregation `cnt`: did you mean `count`?"),
        "{msg}"
    );
}

#[test]
fn unknown_entity_and_field() {
    let text = format!(
        "{HEAD}\n[[view]]\nname = \"v\"\nentity = \"usr\"\nlayer = \"batch\"\n\n[[view.feature]]\nname = \"c\"\naggregation = \"count\"\n"
    );
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (7, 10));
    assert_eq!(
        msg,
        "view `v` uses unknown entity `usr`: did you mean `user`?"
    );

    let text = with_feature(
        "layer = \"batch\"",
        "name = \"s\"\naggregation = \"sum\"\nvalue = \"min(amout, 1000)\"",
    );
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (13, 14));
    assert!(msg.contains("unknown field `amout`"), "{msg}");
}

#[test]
fn streaming_feature_with_batch_only_aggregation() {
    let text = with_feature(
        "layer = \"streaming\"",
        "name = \"r\"\naggregation = \"pct_rank\"\nof = { aggregation = \"sum\", value = \"amount\" }\nwindow = \"1h\"\nresolution = \"1m\"",
    );
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (12, 15));
    assert!(
        msg.contains("`pct_rank` is a batch-only aggregation")
            && msg.contains("move the feature to a batch view"),
        "{msg}"
    );
}

#[test]
fn window_not_a_multiple_of_resolution() {
    let text = with_feature(
        "layer = \"streaming\"",
        "name = \"c\"\naggregation = \"count\"\nwindow = \"90m\"\nresolution = \"7m\"",
    );
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (13, 10));
    assert_eq!(
        msg,
        "window 90m is not a multiple of its resolution 7m: make the window a whole number of resolutions (such as 91m) or choose a resolution that divides it"
    );
}

#[test]
fn duplicate_feature_names() {
    let text = format!(
        "{}\n[[view.feature]]\nname = \"c\"\naggregation = \"count\"\nwindow = \"1h\"\nresolution = \"1m\"\n",
        with_feature(
            "layer = \"streaming\"",
            "name = \"c\"\naggregation = \"count\"\nwindow = \"10m\"\nresolution = \"1m\""
        )
    );
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (17, 8));
    assert!(
        msg.starts_with("duplicate feature name `c` (first defined at line 11, column 8)"),
        "{msg}"
    );
    assert!(msg.contains("distinct `version`"), "{msg}");
}

#[test]
fn versions_make_names_distinct() {
    let text = format!(
        "{}\n[[view.feature]]\nname = \"c\"\nversion = 2\naggregation = \"count\"\nwindow = \"1h\"\nresolution = \"1m\"\n",
        with_feature(
            "layer = \"streaming\"",
            "name = \"c\"\nversion = 1\naggregation = \"count\"\nwindow = \"10m\"\nresolution = \"1m\""
        )
    );
    let spec = parse_spec("ok.toml", &text).unwrap();
    let names: Vec<_> = spec.features().map(|(_, f)| f.name.clone()).collect();
    assert_eq!(names, ["c_v1", "c_v2"]);
}

#[test]
fn ttl_shorter_than_resolution() {
    let text = with_feature(
        "layer = \"batch\"\nttl = \"12h\"",
        "name = \"c\"\naggregation = \"count\"\nwindow = \"2d\"\nresolution = \"1d\"",
    );
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (9, 7));
    assert_eq!(
        msg,
        "ttl 12h is shorter than the resolution 1d of feature `c`: values would expire before their tile is complete; make the ttl at least 1d"
    );

    let text = with_feature(
        "layer = \"batch\"\ncadence = \"2d\"\nttl = \"1d\"",
        "name = \"c\"\naggregation = \"count\"\nwindow = \"2h\"\nresolution = \"1h\"",
    );
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (10, 7));
    assert!(
        msg.starts_with("ttl 1d is shorter than the cadence 2d"),
        "{msg}"
    );
}

#[test]
fn resolution_must_divide_the_cadence() {
    let text = with_feature(
        "layer = \"batch\"\ncadence = \"6h\"",
        "name = \"c\"\naggregation = \"count\"\nwindow = \"2d\"\nresolution = \"1d\"",
    );
    let (line, col, msg) = first_error(&text);
    assert_eq!((line, col), (15, 14));
    assert!(
        msg.starts_with("resolution 1d does not divide the view's cadence 6h"),
        "{msg}"
    );
}

#[test]
fn every_problem_is_reported_in_file_order() {
    let text = with_feature(
        "layer = \"batch\"\nbogus = 1",
        "name = \"c\"\naggregation = \"count\"\nwindow = \"90m\"\nresolution = \"7m\"",
    );
    let errs = parse_spec("bad.toml", &text).unwrap_err();
    assert_eq!(errs.0.len(), 2, "{errs}");
    assert!(errs.0[0].line < errs.0[1].line);
    assert!(
        errs.to_string()
            .starts_with("bad.toml:9:1: unknown key `bogus`"),
        "{errs}"
    );
}

#[test]
fn streaming_state_must_be_bounded() {
    let text = with_feature(
        "layer = \"streaming\"",
        "name = \"c\"\naggregation = \"count\"",
    );
    let (_, _, msg) = first_error(&text);
    assert!(msg.contains("state would grow forever"), "{msg}");
}

#[test]
fn history_is_a_positive_duration_of_streaming_views() {
    let count = "name = \"c\"\naggregation = \"count\"\nwindow = \"2d\"\nresolution = \"1d\"";
    let (line, col, msg) =
        first_error(&with_feature("layer = \"batch\"\nhistory = \"30d\"", count));
    assert_eq!((line, col), (9, 1));
    assert_eq!(msg, "`history` applies to streaming views only: remove it");
    let minute = "name = \"c\"\naggregation = \"count\"\nwindow = \"1h\"\nresolution = \"1m\"";
    let (_, _, msg) = first_error(&with_feature(
        "layer = \"streaming\"\nhistory = \"0s\"",
        minute,
    ));
    assert_eq!(msg, "`history` must be longer than zero");
    let (_, _, msg) = first_error(&with_feature(
        "layer = \"streaming\"\nhistory = \"a year\"",
        minute,
    ));
    assert!(msg.starts_with("`history`: "), "{msg}");
    // Given, it is kept; omitted, none is kept.
    let spec = parse_spec(
        "ok.toml",
        &with_feature("layer = \"streaming\"\nhistory = \"90d\"", minute),
    )
    .unwrap();
    assert_eq!(spec.views[0].history.to_string(), "90d");
    let spec = parse_spec("ok.toml", &with_feature("layer = \"streaming\"", minute)).unwrap();
    assert_eq!(spec.views[0].history.as_ms(), 0);
    let catalog = parse_spec("catalog.toml", CATALOG).unwrap();
    assert_eq!(
        catalog.view("user_realtime").unwrap().history.to_string(),
        "400d"
    );
}
