//! Charts, checked on the SVG they render: legends cover no data point, series that coincide stay visible,
//! integer axes have integer ticks, counts print as integers, no "-0" tick, panels of one figure share their
//! epoch axis, and lines come from any DataFrame.
use distill::plot::{lines_from_frame, Figure, Panel, PanelKind, Series};
use distill::polars::prelude::*;
use regex::Regex;

/// Legend boxes (x, y, width, height): the translucent white rectangles plotters draws behind a legend.
fn legend_boxes(svg: &str) -> Vec<(f64, f64, f64, f64)> {
    let re = Regex::new(r#"<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)" opacity="0.85""#).unwrap();
    re.captures_iter(svg).map(|c| (c[1].parse().unwrap(), c[2].parse().unwrap(), c[3].parse().unwrap(), c[4].parse().unwrap())).collect()
}

/// Centres of the circle and triangle markers, with their colour.
fn markers(svg: &str) -> Vec<(f64, f64, String)> {
    let circles = Regex::new(r#"<circle cx="([\d.]+)" cy="([\d.]+)" r="\d+" opacity="1" fill="(#[0-9A-F]+|none)" stroke="(#[0-9A-F]+|none)""#).unwrap();
    let triangles = Regex::new(r#"<polygon opacity="1" fill="(#[0-9A-F]+)" points="([\d.]+),([\d.]+) "#).unwrap();
    let mut out: Vec<(f64, f64, String)> = circles
        .captures_iter(svg)
        .map(|c| (c[1].parse().unwrap(), c[2].parse().unwrap(), if &c[3] == "none" { c[4].to_string() } else { c[3].to_string() }))
        .collect();
    // A triangle's first point is its apex, 4 px above its centre.
    out.extend(triangles.captures_iter(svg).map(|c| (c[2].parse().unwrap(), c[3].parse::<f64>().unwrap() + 4.0, c[1].to_string())));
    out
}

/// The text of every `<text>` element.
fn texts(svg: &str) -> Vec<String> {
    Regex::new(r"<text[^>]*>\s*([^<]*?)\s*</text>").unwrap().captures_iter(svg).map(|c| c[1].to_string()).collect()
}

fn lines(series: Vec<Series>) -> Figure {
    Figure::new("t", vec![Panel::new("p", "sparsity", "top-1 (%)", PanelKind::Lines(series))], 1)
}

#[test]
fn the_legend_covers_no_data_point() {
    // Notebook 05's case: four tensors flat near the top, fc3 falling to 87.8% at sparsity 0.9 (bottom right).
    let flat = |name: &str, top: f64| Series::new(name, (0..10).map(|i| (0.1 * i as f64, top - 0.01 * i as f64)).collect());
    let mut series = vec![flat("conv1.weight", 98.4), flat("conv2.weight", 98.3), flat("fc1.weight", 98.2), flat("fc2.weight", 98.1)];
    series.push(Series::new("fc3.weight", (0..10).map(|i| (0.1 * i as f64, if i < 9 { 98.0 - 0.05 * i as f64 } else { 87.8 })).collect()));
    let svg = lines(series).to_svg().unwrap();
    let boxes = legend_boxes(&svg);
    assert_eq!(boxes.len(), 1);
    let (x, y, w, h) = boxes[0];
    let points = markers(&svg);
    // Circles, triangles and rings (the third series' crosses are lines): 4 series × 10 points.
    assert_eq!(points.len(), 40);
    for (px, py, _) in &points {
        assert!(!(*px >= x - 3.0 && *px <= x + w + 3.0 && *py >= y - 3.0 && *py <= y + h + 3.0), "marker ({px}, {py}) under the legend {boxes:?}");
    }
}

#[test]
fn a_legend_that_would_cover_a_line_in_every_corner_goes_beside_the_plot() {
    // Two diagonals pass through all four corners.
    let rising = Series::new("rising", (0..=10).map(|i| (i as f64, i as f64)).collect());
    let falling = Series::new("falling", (0..=10).map(|i| (i as f64, 10.0 - i as f64)).collect());
    let svg = lines(vec![rising, falling]).to_svg().unwrap();
    let boxes = legend_boxes(&svg);
    assert_eq!(boxes.len(), 1);
    let (x, _, _, _) = boxes[0];
    let points = markers(&svg);
    assert_eq!(points.len(), 22);
    let rightmost = points.iter().map(|p| p.0).fold(f64::MIN, f64::max);
    assert!(x > rightmost + 3.0, "legend at x = {x}, a marker at {rightmost}");
    assert!(x < 520.0, "the legend stays inside the figure");
}

#[test]
fn series_that_coincide_stay_visible() {
    // Notebook 02's case: two tensors with the same targets, and a constant learning rate under another.
    let targets = vec![(0.0, 0.0), (2.0, 40.0), (4.0, 60.0), (6.0, 70.0)];
    let svg = lines(vec![Series::new("fc1.weight", targets.clone()), Series::new("conv2.weight", targets)]).to_svg().unwrap();
    let points = markers(&svg);
    let blue: Vec<_> = points.iter().filter(|p| p.2 == "#1F77B4").collect();
    let orange: Vec<_> = points.iter().filter(|p| p.2 == "#FF7F0E").collect();
    assert_eq!((blue.len(), orange.len()), (4, 4), "both series keep their markers");
    // The second is dashed: its line is drawn as many short segments, so the first shows between them.
    let segments = Regex::new(r##"<polyline fill="none" opacity="1" stroke="#FF7F0E""##).unwrap().find_iter(&svg).count();
    assert!(segments > 10, "{segments} segments");
}

#[test]
fn integer_axes_get_integer_ticks_and_no_minus_zero() {
    let epochs = Series::new("valid", (0..10).map(|e| (e as f64, 90.0 + e as f64 * 0.5)).collect());
    let svg = lines(vec![epochs]).to_svg().unwrap();
    let t = texts(&svg);
    for e in 0..10 {
        assert!(t.contains(&e.to_string()), "epoch tick {e} missing: {t:?}");
    }
    assert!(!t.iter().any(|x| x == "0.5" || x == "7.5" || x == "1.0"), "{t:?}");
    // A histogram's counts print as integers; a symmetric value axis has no "-0" tick.
    let histogram = PanelKind::Histogram { edges: vec![-1.0, -0.5, 0.0, 0.5, 1.0], counts: vec![3500.0, 120.0, 80.0, 10.0] };
    let svg = Figure::new("h", vec![Panel::new("h", "value", "count", histogram)], 1).to_svg().unwrap();
    let t = texts(&svg);
    assert!(t.iter().any(|x| x == "3500" || x == "3000") && !t.iter().any(|x| x.ends_with("00.0")), "{t:?}");
    assert!(!t.iter().any(|x| x.starts_with("-0") && x.chars().skip(1).all(|c| c == '0' || c == '.')), "{t:?}");
}

#[test]
fn panels_of_one_figure_share_their_epoch_axis_and_runs_keep_their_colour() {
    let panel = |points: Vec<(f64, f64)>| Panel::new("p", "epoch", "y", PanelKind::Lines(vec![Series::new("a", points)]));
    let figure = Figure::new("f", vec![panel(vec![(0.0, 1.0), (9.0, 2.0)]), panel(vec![(0.0, 1.0), (4.0, 2.0)]).x_range(-0.45, 9.45)], 2);
    let svg = figure.to_svg().unwrap();
    assert!(texts(&svg).iter().filter(|t| *t == "9").count() == 2, "both panels reach epoch 9");
    // A log axis and fixed limits render; an impossible range is an error, not a panic.
    let log = Panel::new("lr", "epoch", "lr", PanelKind::Lines(vec![Series::new("lr", vec![(0.0, 0.1), (5.0, 0.001)])])).log_y();
    assert!(Figure::new("l", vec![log], 1).to_svg().is_ok());
    let bad = Panel::new("p", "x", "y", PanelKind::Lines(vec![Series::new("a", vec![(0.0, -1.0)])])).log_y();
    assert!(Figure::new("b", vec![bad], 1).to_svg().is_err());
}

#[test]
fn lines_come_from_any_dataframe() {
    let df = df!("run" => ["a", "b", "a", "b"], "step" => [1i64, 0, 0, 1], "value" => [0.25, 0.6, 0.5, 0.3]).unwrap();
    let figure = lines_from_frame(&df, "step", "value", Some("run")).unwrap();
    match &figure.panels[0].kind {
        PanelKind::Lines(series) => {
            assert_eq!(series.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
            assert_eq!(series[0].points, [(0.0, 0.5), (1.0, 0.25)]);
        }
        other => panic!("{other:?}"),
    }
    // The title is drawn once: the figure's, not repeated above its only panel.
    let svg = figure.to_svg().unwrap();
    assert_eq!(texts(&svg).iter().filter(|t| *t == "value against step").count(), 1, "{:?}", texts(&svg));
    assert!(lines_from_frame(&df, "step", "valu", None).unwrap_err().to_string().contains("value"));
}

#[test]
fn heat_maps_draw_every_value_from_the_darkest_to_the_brightest_colour() {
    let maps = tch::Tensor::arange(2 * 3 * 4, (tch::Kind::Float, tch::Device::Cpu)).reshape([2, 3, 4]);
    let figure = distill::plot::heatmaps("maps", &maps, &["a".into(), "b".into()], 2).unwrap();
    let svg = figure.to_svg().unwrap();
    // One filled rectangle per value, and each map spans viridis from its own minimum to its own maximum.
    assert_eq!(svg.matches("fill=\"#440154\"").count(), 2, "each map's lowest value");
    assert_eq!(svg.matches("fill=\"#FDE725\"").count(), 2, "each map's highest value");
    assert!(texts(&svg).contains(&"a".to_string()) && texts(&svg).contains(&"b".to_string()));
    let png = figure.to_png().unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(distill::plot::heatmaps("x", &maps, &["only one".into()], 2).is_err());
    assert!(distill::plot::heatmaps("x", &maps.flatten(0, -1), &[], 2).is_err());
}
