//! Charts, checked on the SVG they render: legends cover no data point, series that coincide stay visible,
//! integer axes have integer ticks, counts print as integers, no "-0" tick, panels of one figure share their
//! epoch axis, lines and bars come from any DataFrame, fitted distributions are drawn over histograms, and
//! activation histograms count every output.
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
    // Counts on a logarithmic axis too.
    let histogram = PanelKind::Histogram { edges: vec![0.0, 1.0, 2.0, 3.0, 4.0], counts: vec![1.0, 120.0, 80.0, 1500.0] };
    let svg = Figure::new("h", vec![Panel::new("h", "value", "count", histogram).log_y()], 1).to_svg().unwrap();
    let t = texts(&svg);
    assert!(t.iter().any(|x| x == "1") && t.iter().any(|x| x == "1000"), "{t:?}");
    assert!(!t.iter().any(|x| x.ends_with("0.0") || x == "1.0"), "{t:?}");
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

/// Filled rectangles of one opacity: (x, y, width, height).
fn rects(svg: &str, opacity: &str) -> Vec<(f64, f64, f64, f64)> {
    let re = Regex::new(&format!(r#"<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)" opacity="{opacity}""#)).unwrap();
    re.captures_iter(svg).map(|c| (c[1].parse().unwrap(), c[2].parse().unwrap(), c[3].parse().unwrap(), c[4].parse().unwrap())).collect()
}

fn overlaps(a: (f64, f64, f64, f64), b: (f64, f64, f64, f64)) -> bool {
    a.0 < b.0 + b.2 && b.0 < a.0 + a.2 && a.1 < b.1 + b.3 && b.1 < a.1 + a.3
}

/// A deterministic Laplace sample (its quantiles at (i + ½)/n) fills `fc1.weight`: the Laplace fit scores higher
/// than the Gaussian, both fits are drawn scaled to counts, and their legend covers no bar.
#[test]
fn fitted_distributions_are_drawn_over_a_histogram_and_their_legend_covers_no_bar() {
    let model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu).unwrap();
    let mut w = model.parameter("fc1.weight").unwrap();
    let n = w.numel();
    let b = 0.02;
    let sample: Vec<f32> = (0..n)
        .map(|i| {
            let u = (i as f64 + 0.5) / n as f64 - 0.5;
            (-b * u.signum() * (1.0 - 2.0 * u.abs()).ln()) as f32
        })
        .collect();
    tch::no_grad(|| w.copy_(&tch::Tensor::from_slice(&sample).reshape(w.size())));
    let figure = distill::plot::parameter_histograms(&model, &["fc1.weight"], 50, 1).unwrap();
    let panel = &figure.panels[0];
    // Independently: the median is 0 (a symmetric sample), b̂ = mean |x|, σ̂ = population standard deviation.
    let values: Vec<f64> = sample.iter().map(|&v| v as f64).collect();
    let b_hat = values.iter().map(|v| v.abs()).sum::<f64>() / n as f64;
    let mean = values.iter().sum::<f64>() / n as f64;
    let sigma = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
    let laplace_ll = -(2.0 * b_hat).ln() - 1.0;
    let gauss_ll = -0.5 * (2.0 * std::f64::consts::PI * sigma * sigma).ln() - 0.5;
    assert!(laplace_ll > gauss_ll);
    assert_eq!(panel.overlays[0].name, format!("Gaussian, log-lik. {gauss_ll:.2}"));
    assert_eq!(panel.overlays[1].name, format!("Laplace, log-lik. {laplace_ll:.2}"));
    // The Laplace curve's peak is the expected count of a bucket at the median: n · width / (2b̂).
    let (lo, hi) = (values.iter().cloned().fold(f64::MAX, f64::min), values.iter().cloned().fold(f64::MIN, f64::max));
    let peak = panel.overlays[1].points.iter().map(|p| p.1).fold(0.0, f64::max);
    let expected = n as f64 * (hi - lo) / 50.0 / (2.0 * b_hat);
    assert!((peak - expected).abs() / expected < 0.02, "peak {peak} against {expected}");
    let svg = figure.to_svg().unwrap();
    let bars = rects(&svg, "0.45");
    assert_eq!(bars.len(), 50, "one bar per bucket");
    let legend = legend_boxes(&svg);
    assert_eq!(legend.len(), 1);
    for bar in &bars {
        assert!(!overlaps(*bar, legend[0]), "bar {bar:?} under the legend {legend:?}");
    }
    assert!(texts(&svg).iter().any(|t| t.starts_with("Laplace, log-lik.")));
    assert!(distill::plot::parameter_histograms(&model, &["fc1.weigth"], 50, 1).unwrap_err().to_string().contains("fc1.weight"));
    let _ = tch::no_grad(|| w.fill_(0.5));
    assert!(distill::plot::parameter_histograms(&model, &["fc1.weight"], 50, 1).unwrap_err().to_string().contains("constant"));
}

/// Every layer's counts add up to its outputs over the batches, and equal libtorch's own `histc` of the same
/// outputs over the same range; exact zeros are counted; a NaN weight and unknown names are errors.
#[test]
fn activation_histograms_count_every_output_of_every_layer() {
    use distill::summary::activations::activation_histograms;
    tch::manual_seed(0);
    let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu).unwrap();
    let data = distill::data::Dataset::synthetic(40, [1, 28, 28], 10, 7).unwrap();
    let h = activation_histograms(&mut model, &data, &[], 2, 16, 20).unwrap();
    let layers: Vec<String> = h.column("Layer").unwrap().str().unwrap().iter().map(|s| s.unwrap().to_string()).collect();
    let mut order: Vec<String> = Vec::new();
    for l in &layers {
        if !order.contains(l) {
            order.push(l.clone());
        }
    }
    assert_eq!(order[..4], ["conv1", "relu1", "pool1", "conv2"], "{order:?}");
    assert_eq!(layers.len(), 20 * order.len());
    // The same two batches through the model, the outputs captured by name.
    let inputs: Vec<tch::Tensor> = data.batches(16, tch::Device::Cpu).unwrap().take(2).map(|b| b.unwrap().0).collect();
    let input = tch::Tensor::cat(&inputs, 0);
    let outputs = distill::summary::feature_maps::feature_maps(&mut model, &input, &["relu1", "fc3"]).unwrap();
    for (name, y) in outputs {
        let y = y.to_kind(tch::Kind::Double);
        let rows = h.clone().lazy().filter(col("Layer").eq(lit(name.as_str()))).collect().unwrap();
        let counts: Vec<i64> = rows.column("Count").unwrap().i64().unwrap().into_no_null_iter().collect();
        assert_eq!(counts.iter().sum::<i64>(), y.numel() as i64, "{name}: every output counted");
        let lo = y.min().double_value(&[]);
        let first_low = rows.column("Low").unwrap().f64().unwrap().get(0).unwrap();
        assert_eq!(first_low, lo);
        // histc's range defaults to the values' own minimum and maximum.
        let histc: Vec<f64> = Vec::try_from(&y.histc(20)).unwrap();
        assert_eq!(counts, histc.iter().map(|&c| c as i64).collect::<Vec<_>>(), "{name}");
        let zeros = 100.0 * y.eq(0.0).sum(tch::Kind::Int64).int64_value(&[]) as f64 / y.numel() as f64;
        assert_eq!(rows.column("Zeros (%)").unwrap().f64().unwrap().get(0).unwrap(), zeros);
        if name == "relu1" {
            assert!(zeros > 10.0, "a ReLU's output has zeros: {zeros}%");
        }
    }
    let figure = distill::plot::activation_histograms(&h, 3).unwrap();
    assert_eq!(figure.panels.len(), order.len());
    assert!(figure.panels.iter().all(|p| p.log_y), "counts on a log axis");
    assert!(figure.to_svg().is_ok());
    let err = activation_histograms(&mut model, &data, &["relu11"], 2, 16, 20).unwrap_err().to_string();
    assert!(err.contains("relu1"), "{err}");
    assert!(activation_histograms(&mut model, &data, &[], 2, 16, 0).is_err());
    let _ = tch::no_grad(|| model.parameter("fc1.weight").unwrap().fill_(f64::NAN));
    let err = activation_histograms(&mut model, &data, &[], 2, 16, 20).unwrap_err().to_string();
    assert!(err.contains("fc1") && err.contains("non-finite"), "{err}");
}

/// Grouped bars: one bar per row and value column, each column in its colour, the legend beside the bars.
#[test]
fn grouped_bars_come_from_any_dataframe_with_the_legend_beside_them() {
    let df = df!("layer" => ["conv1", "conv2", "fc1"], "weights" => [150i64, 2400, 48000], "outputs" => [4704i64, 1600, 120]).unwrap();
    let figure = distill::plot::bars_from_frame(&df, "layer", &["weights", "outputs"]).unwrap();
    let svg = figure.to_svg().unwrap();
    let filled = |colour: &str| Regex::new(&format!(r#"<rect x="([\d.]+)" y="[\d.]+" width="[\d.]+" height="[\d.]+" opacity="1" fill="{colour}""#)).unwrap().captures_iter(&svg).map(|c| c[1].parse::<f64>().unwrap()).collect::<Vec<_>>();
    let (blue, orange) = (filled("#1F77B4"), filled("#FF7F0E"));
    // Three bars and one legend swatch each.
    assert_eq!((blue.len(), orange.len()), (4, 4), "{svg}");
    let legend = legend_boxes(&svg);
    assert_eq!(legend.len(), 1);
    let rightmost_bar = blue.iter().chain(&orange).filter(|x| **x < legend[0].0).fold(0.0f64, |a, b| a.max(*b));
    assert!(legend[0].0 > rightmost_bar, "the legend is right of every bar");
    for label in ["conv1", "conv2", "fc1", "weights", "outputs"] {
        assert!(texts(&svg).iter().any(|t| t == label), "{label}");
    }
    let bad = PanelKind::GroupedBars { labels: vec!["a".into(), "b".into()], groups: vec![("g".into(), vec![1.0])] };
    assert!(Figure::new("b", vec![Panel::new("p", "x", "y", bad)], 1).to_svg().unwrap_err().to_string().contains("'g' has 1 values for 2 labels"));
    assert!(distill::plot::bars_from_frame(&df, "layer", &["weight"]).unwrap_err().to_string().contains("weights"));
}

/// A point marked by the first series stays visible under the lines of the series after it: markers are drawn
/// over every line.
#[test]
fn markers_are_drawn_over_the_lines_of_later_series() {
    let point = Series::new("minimum", vec![(0.5, 0.0)]);
    let through = Series::new("path", vec![(0.0, 0.0), (1.0, 0.0)]).without_markers();
    let svg = lines(vec![point, through]).to_svg().unwrap();
    let marker = svg.find("<circle").expect("the point's marker");
    // The path's line: the first polyline in its colour (the legend's samples come at the end).
    let line = svg.find(r##"<polyline fill="none" opacity="1" stroke="#FF7F0E""##).expect("the path's line");
    assert!(marker > line, "the marker comes after (over) the line");
    assert_eq!(markers(&svg).len(), 1, "the path has no markers");
}
