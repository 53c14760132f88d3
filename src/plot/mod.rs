//! Charts drawn with plotters: each is a [`Figure`] (one or more panels) that renders to SVG or PNG and shows
//! inline in an evcxr cell. Text uses the DejaVu Sans font compiled into the library, so no system font is
//! needed; every drawing error is an [`Error`], never a panic.
mod charts;
mod raster;

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use image::ImageEncoder;
use plotters::prelude::*;

use crate::{Error, Result};

pub use charts::{
    activation_histograms, bars_from_frame, early_exit_tradeoff, heatmaps, lines_from_frame, parameter_histograms, quantization_ranges, schedule_preview,
    sensitivity_curves, sparsity_bars, training_curves, weight_histogram,
};

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok { Ok(()) } else { Err(Error::Table("the embedded font could not be loaded".into())) }
}

fn draw_err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Table(format!("drawing failed: {e:?}"))
}

/// A named line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
    /// Palette colour (index into the 8-colour palette); `None`: the series' position in its panel.
    pub color: Option<usize>,
    /// Draw the line dashed. A series that coincides with an earlier one is dashed anyway, so both stay visible.
    pub dashed: bool,
    /// Draw a marker at every point (the default; a dense curve such as a fitted density reads better without).
    pub markers: bool,
}

impl Series {
    /// A solid line in the colour of its position.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, color: None, dashed: false, markers: true }
    }

    /// Uses palette colour `index` (series of one run can share a colour and differ by dashes).
    pub fn color(mut self, index: usize) -> Self {
        self.color = Some(index);
        self
    }

    /// Draws the line dashed.
    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }

    /// Draws the line alone, without a marker at each point.
    pub fn without_markers(mut self) -> Self {
        self.markers = false;
        self
    }
}

/// What a panel shows.
#[derive(Debug, Clone, PartialEq)]
pub enum PanelKind {
    /// Lines over a numeric x axis.
    Lines(Vec<Series>),
    /// One bar per label.
    Bars {
        /// Category labels.
        labels: Vec<String>,
        /// Bar heights.
        values: Vec<f64>,
    },
    /// A histogram: `edges` has one more element than `counts`. It honours the panel's axis limits, its
    /// logarithmic y axis and its [`Panel::overlays`] (fitted densities drawn over the bars).
    Histogram {
        /// Bucket edges.
        edges: Vec<f64>,
        /// Counts per bucket.
        counts: Vec<f64>,
    },
    /// Several bars per label, side by side, one colour per group, with the legend beside the plot: e.g. each
    /// layer's weights and feature-map footprint.
    GroupedBars {
        /// Category labels.
        labels: Vec<String>,
        /// (group name, one value per label) per group.
        groups: Vec<(String, Vec<f64>)>,
    },
    /// Low/high ranges per label (drawn as vertical spans).
    Ranges {
        /// Category labels.
        labels: Vec<String>,
        /// (low, high) per label.
        ranges: Vec<(f64, f64)>,
    },
    /// An image of `height × width` values, row by row from the top, coloured from its lowest value (dark
    /// violet) to its highest (yellow) on the viridis scale: a feature map, a class-activation map, a digit.
    Heatmap {
        /// Columns.
        width: usize,
        /// Rows.
        height: usize,
        /// `height · width` values, row-major.
        values: Vec<f64>,
    },
}

/// One chart of a figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Panel title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Content.
    pub kind: PanelKind,
    /// X axis limits of a line panel; `None`: the data's range, padded.
    pub x_range: Option<(f64, f64)>,
    /// Y axis limits of a line panel; `None`: the data's range, padded.
    pub y_range: Option<(f64, f64)>,
    /// A logarithmic y axis (line and histogram panels; values ≤ 0 are left out).
    pub log_y: bool,
    /// Lines drawn over a histogram, e.g. the densities fitted to it, scaled to counts.
    pub overlays: Vec<Series>,
}

impl Panel {
    /// A panel with axes fitted to its data.
    ///
    /// ```
    /// use distill::plot::{Figure, Panel, PanelKind, Series};
    /// let loss = Series::new("loss", vec![(0.0, 2.3), (1.0, 0.4), (2.0, 0.1)]);
    /// let panel = Panel::new("Loss", "epoch", "cross-entropy", PanelKind::Lines(vec![loss])).log_y().x_range(0.0, 4.0);
    /// let svg = Figure::new("Training", vec![panel], 1).to_svg()?;
    /// assert!(svg.contains("<svg"));
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn new(title: impl Into<String>, x_label: impl Into<String>, y_label: impl Into<String>, kind: PanelKind) -> Self {
        Panel { title: title.into(), x_label: x_label.into(), y_label: y_label.into(), kind, x_range: None, y_range: None, log_y: false, overlays: Vec::new() }
    }

    /// Draws `series` over the panel's histogram (a fitted density, say), with a legend where it covers neither
    /// the bars nor the lines.
    pub fn overlay(mut self, series: Series) -> Self {
        self.overlays.push(series);
        self
    }

    /// Fixes the x axis to `lo..hi`.
    pub fn x_range(mut self, lo: f64, hi: f64) -> Self {
        self.x_range = Some((lo, hi));
        self
    }

    /// Fixes the y axis to `lo..hi`.
    pub fn y_range(mut self, lo: f64, hi: f64) -> Self {
        self.y_range = Some((lo, hi));
        self
    }

    /// Draws the y axis on a logarithmic scale.
    pub fn log_y(mut self) -> Self {
        self.log_y = true;
        self
    }
}

/// A figure: a title and panels laid out in a grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Figure title (drawn above the panels).
    pub title: String,
    /// Panels, row by row.
    pub panels: Vec<Panel>,
    /// Panels per row.
    pub columns: usize,
    /// Size in pixels.
    pub size: (u32, u32),
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn padded(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if hi > lo {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}

fn category_label(labels: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() < 1e-6 && i >= 0.0 {
        labels.get(i as usize).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

/// A chart whose x axis is one slot per label, with the panel's axis descriptions drawn.
fn category_chart<'a, 'b, DB: DrawingBackend>(
    mut builder: ChartBuilder<'a, 'b, DB>,
    p: &Panel,
    labels: &[String],
    (y0, y1): (f64, f64),
) -> Result<ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>>> {
    let n = labels.len().max(1) as f64;
    let mut chart = builder.build_cartesian_2d(-0.5..n - 0.5, y0..y1).map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc(&p.x_label)
        .y_desc(&p.y_label)
        .x_labels(labels.len().max(1))
        .x_label_formatter(&|x| category_label(labels, *x))
        .y_label_formatter(&|y| tick_text(*y, y1 - y0, false))
        .label_style(("sans-serif", 11))
        .draw()
        .map_err(draw_err)?;
    Ok(chart)
}

/// A histogram's bar: from `x0` to `x1`, from the axis up to `height`.
#[derive(Debug, Clone, Copy)]
struct Bar {
    x0: f64,
    x1: f64,
    height: f64,
}

/// The legend's width in pixels for `series` (13 px text beside an 18 px sample).
fn legend_width(series: &[Series]) -> f64 {
    7.0 * series.iter().map(|s| s.name.chars().count()).max().unwrap_or(0) as f64 + 60.0
}

/// The corner where the legend of `series` covers the least of their lines, for a plotting area of `pixels`
/// (width, height), and how many line samples it still covers there: each line is sampled along its segments and
/// the samples inside each corner's legend box (13 px text, a row per series) are counted, and so is every bar
/// (by its top and its foot); ties go to upper right, lower right, upper left, lower left in that order.
fn legend_corner(series: &[Series], bars: &[Bar], (x0, x1): (f64, f64), y_axis: (f64, f64), log_y: bool, pixels: (f64, f64)) -> (SeriesLabelPosition, usize) {
    let width = (legend_width(series) / pixels.0.max(1.0)).min(1.0);
    let height = ((20.0 * series.len() as f64 + 20.0) / pixels.1.max(1.0)).min(1.0);
    let fraction = |v: f64, lo: f64, hi: f64| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
    // On a logarithmic axis the fractions are those of the logarithms.
    let scale = |v: f64| if log_y { v.max(f64::MIN_POSITIVE).ln() } else { v };
    let (y0, y1) = (scale(y_axis.0), scale(y_axis.1));
    let fraction_y = |v: f64| fraction(scale(v), y0, y1);
    let mut samples = Vec::new();
    for s in series {
        for pair in s.points.windows(2) {
            for k in 0..10 {
                let t = k as f64 / 10.0;
                let (x, y) = (pair[0].0 + t * (pair[1].0 - pair[0].0), pair[0].1 + t * (pair[1].1 - pair[0].1));
                samples.push((fraction(x, x0, x1), fraction_y(y)));
            }
        }
        samples.extend(s.points.last().map(|&(x, y)| (fraction(x, x0, x1), fraction_y(y))));
    }
    // A bar covers its column from the axis up to its top: sampled at its top and its foot, at its centre.
    for bar in bars {
        let x = fraction(0.5 * (bar.x0 + bar.x1), x0, x1);
        samples.push((x, fraction_y(bar.height)));
        samples.push((x, 0.0));
    }
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let covered = |right: bool, top: bool| {
        samples.iter().filter(|(fx, fy)| (if right { *fx >= 1.0 - width } else { *fx <= width }) && (if top { *fy >= 1.0 - height } else { *fy <= height })).count()
    };
    let mut best = (SeriesLabelPosition::UpperRight, usize::MAX);
    for (position, right, top) in corners {
        let n = covered(right, top);
        if n < best.1 {
            best = (position, n);
        }
    }
    best
}

/// Tick text for an axis spanning `span`: whole numbers only on an integer axis (epochs, counts), otherwise
/// the decimals the ticks' spacing needs; never "-0".
fn tick_text(v: f64, span: f64, integer: bool) -> String {
    let text = if integer {
        if (v - v.round()).abs() > 1e-9 {
            return String::new();
        }
        format!("{}", v.round())
    } else {
        // The spacing plotters picks for about ten ticks: the smallest of 1, 2, 5 × 10^k that is at least span / 10.
        let raw = span / 10.0;
        let decimals = if raw > 0.0 && raw.is_finite() {
            let k = raw.log10().floor();
            let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * 10f64.powf(k)).find(|s| *s >= raw * (1.0 - 1e-9)).unwrap_or(raw);
            (-step.log10().floor()).clamp(0.0, 8.0) as usize
        } else {
            2
        };
        format!("{v:.decimals$}")
    };
    match text.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => text,
    }
}

fn whole(values: impl IntoIterator<Item = f64>) -> bool {
    values.into_iter().all(|v| v.is_finite() && v == v.round())
}

/// The earlier series of `series` that `j` coincides with (same points), if any.
fn coincides(series: &[Series], j: usize, (y0, y1): (f64, f64)) -> bool {
    let tolerance = 1e-9 * (y1 - y0).abs().max(1.0);
    series[..j].iter().any(|s| {
        s.points.len() == series[j].points.len()
            && s.points.iter().zip(&series[j].points).all(|(a, b)| (a.0 - b.0).abs() <= tolerance && (a.1 - b.1).abs() <= tolerance)
    })
}

/// Draws `series` as lines over `bars` (a histogram's, drawn first), with axes fitted to both unless the panel
/// fixes them, and the legend of the series where it covers nothing, or beside the plot.
fn draw_lines<DB: DrawingBackend>(mut builder: ChartBuilder<'_, '_, DB>, area: &DrawingArea<DB, Shift>, p: &Panel, series: &[Series], bars: &[Bar]) -> Result<()> {
    let shown = |pt: &&(f64, f64)| pt.0.is_finite() && pt.1.is_finite() && (!p.log_y || pt.1 > 0.0);
    let bars: Vec<Bar> = bars.iter().copied().filter(|b| b.x0.is_finite() && b.x1.is_finite() && b.height.is_finite() && (!p.log_y || b.height > 0.0)).collect();
    // Bars stand on zero: on a linear axis zero is part of the range.
    let bar_feet = if p.log_y || bars.is_empty() { None } else { Some(0.0) };
    let xs = || series.iter().flat_map(|s| s.points.iter().filter(shown).map(|p| p.0)).chain(bars.iter().flat_map(|b| [b.x0, b.x1]));
    let ys = || series.iter().flat_map(|s| s.points.iter().filter(shown).map(|p| p.1)).chain(bars.iter().map(|b| b.height)).chain(bar_feet);
    let (x0, x1) = p.x_range.unwrap_or_else(|| padded(xs().fold(f64::INFINITY, f64::min), xs().fold(f64::NEG_INFINITY, f64::max)));
    let (y0, y1) = p.y_range.unwrap_or_else(|| {
        let (lo, hi) = (ys().fold(f64::INFINITY, f64::min), ys().fold(f64::NEG_INFINITY, f64::max));
        if p.log_y && lo.is_finite() && hi.is_finite() {
            (lo / 1.2, hi * 1.2)
        } else if bar_feet.is_some() && lo >= 0.0 {
            // Bars of counts rise from the axis itself.
            (0.0, padded(lo, hi).1)
        } else {
            padded(lo, hi)
        }
    });
    if !(x0 < x1 && y0 < y1) || (p.log_y && y0 <= 0.0) {
        return Err(Error::invalid("chart", format!("panel '{}': empty or inverted axis range x {x0}..{x1}, y {y0}..{y1}", p.title)));
    }
    let x_integer = whole(xs()) && x1 - x0 >= 2.0;
    let x_labels = if x_integer { ((x1 - x0).floor() as usize + 1).clamp(2, 11) } else { 10 };
    let legend = series.len() > 1 || series.first().is_some_and(|s| !s.name.is_empty());
    let (w, h) = area.dim_in_pixel();
    // The plotting area: the panel less its caption, axis label areas and margins.
    let (corner, covered) = legend_corner(series, &bars, (x0, x1), (y0, y1), p.log_y, (w as f64 - 80.0, h as f64 - 95.0));
    // Where every corner would hide part of a line, the legend goes beside the plot, in a margin kept for it.
    let outside = legend && covered > 0;
    if outside {
        builder.margin_right(legend_width(series) as u32 + 15);
    }
    // No more tick labels than fit side by side (8 px a character and a gap), so that none runs into the next.
    let plot_width = w as f64 - 80.0 - if outside { legend_width(series) + 15.0 } else { 0.0 };
    let label_chars = [x0, x1].iter().map(|x| tick_text(*x, x1 - x0, x_integer).chars().count()).max().unwrap_or(1).max(1);
    let x_labels = x_labels.min(((plot_width / (8.0 * label_chars as f64 + 24.0)) as usize).max(3));
    let x_fmt = move |x: &f64| tick_text(*x, x1 - x0, x_integer);
    // Counts (whole numbers) get whole-number ticks on either axis.
    let y_integer = whole(ys()) && (p.log_y || y1 - y0 >= 2.0);
    if p.log_y {
        let mut chart = builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(draw_err)?;
        chart.configure_mesh().x_desc(&p.x_label).y_desc(&p.y_label).x_labels(x_labels).x_label_formatter(&x_fmt).y_label_formatter(&|y| tick_text(*y, *y, y_integer)).label_style(("sans-serif", 13)).draw().map_err(draw_err)?;
        draw_series_on(&mut chart, series, (&bars, y0), &shown, (y0, y1))?;
        if outside {
            draw_side_legend(area, chart.plotting_area(), series, (y0, y1), false)?;
        } else if legend {
            chart.configure_series_labels().label_font(("sans-serif", 13)).background_style(WHITE.mix(0.85)).border_style(BLACK).position(corner).draw().map_err(draw_err)?;
        }
    } else {
        let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1).map_err(draw_err)?;
        chart.configure_mesh().x_desc(&p.x_label).y_desc(&p.y_label).x_labels(x_labels).x_label_formatter(&x_fmt).y_label_formatter(&|y| tick_text(*y, y1 - y0, y_integer)).label_style(("sans-serif", 13)).draw().map_err(draw_err)?;
        draw_series_on(&mut chart, series, (&bars, 0.0), &shown, (y0, y1))?;
        if outside {
            draw_side_legend(area, chart.plotting_area(), series, (y0, y1), false)?;
        } else if legend {
            chart.configure_series_labels().label_font(("sans-serif", 13)).background_style(WHITE.mix(0.85)).border_style(BLACK).position(corner).draw().map_err(draw_err)?;
        }
    }
    Ok(())
}

/// The legend in the margin right of the plotting area `plot` (kept free for it), in the style of the legend
/// plotters draws inside: a line sample per series, dashed where its line is, or a filled swatch for bars.
fn draw_side_legend<DB: DrawingBackend, X>(area: &DrawingArea<DB, Shift>, plot: &DrawingArea<DB, X>, series: &[Series], y_range: (f64, f64), swatches: bool) -> Result<()>
where
    X: plotters::coord::CoordTranslate,
{
    let (area_x, area_y) = area.get_base_pixel();
    let (plot_x, plot_y) = plot.get_base_pixel();
    let left = plot_x - area_x + plot.dim_in_pixel().0 as i32 + 12;
    let top = plot_y - area_y;
    let (row, width) = (20, legend_width(series) as i32);
    let corners = [(left, top), (left + width, top + row * series.len() as i32 + 10)];
    area.draw(&Rectangle::new(corners, WHITE.mix(0.85).filled())).map_err(draw_err)?;
    area.draw(&Rectangle::new(corners, BLACK)).map_err(draw_err)?;
    for (i, s) in series.iter().enumerate() {
        let style = PALETTE[s.color.unwrap_or(i) % PALETTE.len()].stroke_width(2);
        let y = top + 15 + row * i as i32;
        if swatches {
            let color = PALETTE[s.color.unwrap_or(i) % PALETTE.len()];
            area.draw(&Rectangle::new([(left + 8, y - 6), (left + 26, y + 6)], color.filled())).map_err(draw_err)?;
        } else {
            let gap = if s.dashed || coincides(series, i, y_range) { 5 } else { 0 };
            area.draw(&PathElement::new(vec![(left + 8, y), (left + 15, y)], style)).map_err(draw_err)?;
            area.draw(&PathElement::new(vec![(left + 15 + gap, y), (left + 26, y)], style)).map_err(draw_err)?;
        }
        area.draw(&Text::new(s.name.clone(), (left + 32, y - 7), ("sans-serif", 13))).map_err(draw_err)?;
    }
    Ok(())
}

/// Draws `bars` (a histogram's, standing on `bar_base`), then each series' line in order (dashed when asked or when
/// it coincides with an earlier series, so both stay visible), then every series' markers over the lines, their
/// shape cycling with the series (circle, triangle, cross, ring).
fn draw_series_on<'a, DB: DrawingBackend + 'a, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    series: &[Series],
    bars: (&[Bar], f64),
    shown: &dyn Fn(&&(f64, f64)) -> bool,
    y_range: (f64, f64),
) -> Result<()> {
    let (bars, bar_base) = bars;
    chart.draw_series(bars.iter().map(|b| Rectangle::new([(b.x0, bar_base), (b.x1, b.height)], PALETTE[0].mix(0.45).filled()))).map_err(draw_err)?;
    let drawn: Vec<(RGBColor, Vec<(f64, f64)>)> =
        series.iter().enumerate().map(|(i, s)| (PALETTE[s.color.unwrap_or(i) % PALETTE.len()], s.points.iter().filter(shown).copied().collect())).collect();
    for (i, (s, (color, points))) in series.iter().zip(&drawn).enumerate() {
        let color = *color;
        let style = color.stroke_width(2);
        let dashed = s.dashed || coincides(series, i, y_range);
        let annotation = if dashed {
            chart.draw_series(DashedLineSeries::new(points.iter().copied(), 7, 5, style)).map_err(draw_err)?
        } else {
            chart.draw_series(LineSeries::new(points.iter().copied(), style)).map_err(draw_err)?
        };
        annotation.label(&s.name).legend(move |(x, y)| {
            let style = color.stroke_width(2);
            let gap = if dashed { 5 } else { 0 };
            EmptyElement::at((x, y)) + PathElement::new(vec![(0, 0), (7, 0)], style) + PathElement::new(vec![(7 + gap, 0), (18, 0)], style)
        });
    }
    // Markers over every line, so that a point is never hidden under a later series' line.
    for (i, (s, (color, points))) in series.iter().zip(&drawn).enumerate() {
        if !s.markers {
            continue;
        }
        let color = *color;
        match i % 4 {
            0 => chart.draw_series(points.iter().map(|&pt| Circle::new(pt, 3, color.filled()))).map(|_| ()),
            1 => chart.draw_series(points.iter().map(|&pt| TriangleMarker::new(pt, 4, color.filled()))).map(|_| ()),
            2 => chart.draw_series(points.iter().map(|&pt| Cross::new(pt, 4, color.stroke_width(2)))).map(|_| ()),
            _ => chart.draw_series(points.iter().map(|&pt| Circle::new(pt, 4, color.stroke_width(1)))).map(|_| ()),
        }
        .map_err(draw_err)?;
    }
    Ok(())
}

/// Bars of several groups per label, side by side within the label's slot, legend beside the plot.
fn draw_grouped_bars<DB: DrawingBackend>(builder: ChartBuilder<'_, '_, DB>, area: &DrawingArea<DB, Shift>, p: &Panel, labels: &[String], groups: &[(String, Vec<f64>)]) -> Result<()> {
    if let Some((name, values)) = groups.iter().find(|(_, v)| v.len() != labels.len()) {
        return Err(Error::Shape(format!("grouped bars '{}': group '{name}' has {} values for {} labels", p.title, values.len(), labels.len())));
    }
    let legend: Vec<Series> = groups.iter().map(|(name, _)| Series::new(name.clone(), Vec::new())).collect();
    let mut builder = builder;
    builder.margin_right(legend_width(&legend) as u32 + 15);
    let values = || groups.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| v.is_finite());
    let y = p.y_range.unwrap_or_else(|| {
        let (lo, hi) = (values().fold(0.0, f64::min), values().fold(0.0, f64::max));
        let (padded_lo, padded_hi) = padded(lo, hi);
        // Bars rise from the axis itself when none is negative.
        (if lo >= 0.0 { 0.0 } else { padded_lo }, padded_hi)
    });
    let mut chart = category_chart(builder, p, labels, y)?;
    let width = 0.8 / groups.len().max(1) as f64;
    for (g, (_, values)) in groups.iter().enumerate() {
        let color = PALETTE[g % PALETTE.len()];
        let left = -0.4 + width * g as f64;
        chart
            .draw_series(values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| Rectangle::new([(i as f64 + left, 0.0), (i as f64 + left + width * 0.9, v)], color.filled())))
            .map_err(draw_err)?;
    }
    draw_side_legend(area, chart.plotting_area(), &legend, y, true)
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> Result<()> {
    let mut builder = ChartBuilder::on(area);
    // A figure of one panel may leave the panel untitled rather than repeat the figure's title.
    if !p.title.is_empty() {
        builder.caption(&p.title, ("sans-serif", 18));
    }
    builder.margin(10).x_label_area_size(45).y_label_area_size(60);
    match &p.kind {
        PanelKind::Lines(series) => draw_lines(builder, area, p, series, &[])?,
        PanelKind::Bars { labels, values } => {
            let y = padded(values.iter().copied().fold(0.0, f64::min), values.iter().copied().fold(0.0, f64::max));
            let mut chart = category_chart(builder, p, labels, y)?;
            chart
                .draw_series(values.iter().enumerate().map(|(i, &v)| {
                    let x = i as f64;
                    Rectangle::new([(x - 0.35, 0.0), (x + 0.35, v)], PALETTE[0].filled())
                }))
                .map_err(draw_err)?;
        }
        PanelKind::Histogram { edges, counts } => {
            if edges.len() != counts.len() + 1 {
                return Err(Error::Shape(format!("histogram '{}': {} edges for {} counts (one more edge than counts)", p.title, edges.len(), counts.len())));
            }
            let bars: Vec<Bar> = counts.iter().enumerate().map(|(i, &height)| Bar { x0: edges[i], x1: edges[i + 1], height }).collect();
            draw_lines(builder, area, p, &p.overlays, &bars)?
        }
        PanelKind::GroupedBars { labels, groups } => draw_grouped_bars(builder, area, p, labels, groups)?,
        PanelKind::Heatmap { width, height, values } => draw_heatmap(builder, *width, *height, values)?,
        PanelKind::Ranges { labels, ranges } => {
            let y = padded(ranges.iter().map(|r| r.0).fold(0.0, f64::min), ranges.iter().map(|r| r.1).fold(0.0, f64::max));
            let mut chart = category_chart(builder, p, labels, y)?;
            chart
                .draw_series(ranges.iter().enumerate().map(|(i, &(lo, hi))| {
                    let x = i as f64;
                    Rectangle::new([(x - 0.3, lo), (x + 0.3, hi)], PALETTE[1].mix(0.7).filled())
                }))
                .map_err(draw_err)?;
        }
    }
    Ok(())
}

/// Viridis at five stops (matplotlib's values), interpolated linearly.
fn viridis(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [(68.0, 1.0, 84.0), (59.0, 82.0, 139.0), (33.0, 145.0, 140.0), (94.0, 201.0, 98.0), (253.0, 231.0, 37.0)];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 } * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let mix = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn draw_heatmap<DB: DrawingBackend>(mut builder: ChartBuilder<'_, '_, DB>, width: usize, height: usize, values: &[f64]) -> Result<()> {
    if width == 0 || height == 0 || values.len() != width * height {
        return Err(Error::Shape(format!("heat map of {height}×{width} needs {} values, got {}", width * height, values.len())));
    }
    let finite = || values.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = (finite().fold(f64::INFINITY, f64::min), finite().fold(f64::NEG_INFINITY, f64::max));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let mut chart = builder.x_label_area_size(0).y_label_area_size(0).build_cartesian_2d(0.0..width as f64, 0.0..height as f64).map_err(draw_err)?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, v)| {
            let (row, col) = ((i / width) as f64, (i % width) as f64);
            let top = height as f64 - row;
            Rectangle::new([(col, top - 1.0), (col + 1.0, top)], viridis((v - lo) / span).filled())
        }))
        .map_err(draw_err)?;
    Ok(())
}

impl Figure {
    /// A figure of `panels`, `columns` per row, sized to fit.
    pub fn new(title: impl Into<String>, panels: Vec<Panel>, columns: usize) -> Self {
        let columns = columns.clamp(1, panels.len().max(1));
        let rows = panels.len().div_ceil(columns).max(1);
        Figure { title: title.into(), panels, columns, size: (520 * columns as u32, 60 + 380 * rows as u32) }
    }

    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<()> {
        register_font()?;
        root.fill(&WHITE).map_err(draw_err)?;
        let root = if self.title.is_empty() { root } else { root.titled(&self.title, ("sans-serif", 22)).map_err(draw_err)? };
        let rows = self.panels.len().div_ceil(self.columns).max(1);
        let areas = root.split_evenly((rows, self.columns));
        for (p, area) in self.panels.iter().zip(areas.iter()) {
            draw_panel(area, p)?;
        }
        root.present().map_err(draw_err)
    }

    /// The figure as an SVG document.
    pub fn to_svg(&self) -> Result<String> {
        let mut svg = String::new();
        self.draw(SVGBackend::with_string(&mut svg, self.size).into_drawing_area())?;
        Ok(svg)
    }

    /// Writes the SVG to `path`.
    pub fn save_svg(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        crate::io::write_atomic(path, self.to_svg()?.as_bytes())
    }

    /// Renders and writes a PNG to `path`.
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let partial = crate::io::partial_path(path);
        let drawn = raster::PngBackend::new(BitMapBackend::new(&partial, self.size), FONT).and_then(|b| self.draw(b.into_drawing_area()));
        if let Err(e) = drawn {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        crate::io::commit_atomic(&partial, path)
    }

    /// The figure as PNG bytes.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let (w, h) = self.size;
        let mut rgb = vec![0u8; w as usize * h as usize * 3];
        self.draw(raster::PngBackend::new(BitMapBackend::with_buffer(&mut rgb, self.size), FONT)?.into_drawing_area())?;
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&rgb, w, h, image::ColorType::Rgb8)
            .map_err(|e| Error::invalid("chart", format!("cannot encode the PNG: {e}")))?;
        Ok(png)
    }

    /// Shows the figure in an evcxr (Jupyter) cell: the SVG, or a PNG for a figure of heat maps (one vector
    /// rectangle per value would make a notebook megabytes long); the error message as text if it cannot draw.
    pub fn evcxr_display(&self) {
        let raster = self.panels.iter().any(|p| matches!(p.kind, PanelKind::Heatmap { .. }));
        let shown = if raster { self.to_png().map(|png| ("image/png", base64(&png))) } else { self.to_svg().map(|svg| ("image/svg+xml", svg)) };
        match shown {
            Ok((mime, content)) => println!("EVCXR_BEGIN_CONTENT {mime}\n{content}\nEVCXR_END_CONTENT"),
            Err(e) => println!("EVCXR_BEGIN_CONTENT text/plain\n{e}\nEVCXR_END_CONTENT"),
        }
    }
}

/// Standard base64 with padding (RFC 4648), how Jupyter carries binary images.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            out.push(if i <= chunk.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(points: &[(f64, f64)]) -> Series {
        Series::new("a", points.to_vec())
    }

    #[test]
    fn base64_matches_rfc_4648() {
        let cases: [(&[u8], &str); 6] = [(b"", ""), (b"f", "Zg=="), (b"fo", "Zm8="), (b"foo", "Zm9v"), (b"foob", "Zm9vYg=="), (b"fooba", "Zm9vYmE=")];
        for (bytes, text) in cases {
            assert_eq!(base64(bytes), text);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }

    #[test]
    fn the_legend_goes_where_the_lines_are_not() {
        let corner = |s: &[Series]| format!("{:?}", legend_corner(s, &[], (0.0, 1.0), (0.0, 1.0), false, (200.0, 200.0)).0);
        // A line rising to the upper right: the legend goes to the lower right, below its end.
        assert_eq!(corner(&[line(&[(0.0, 0.0), (0.5, 0.9), (1.0, 1.0)])]), "LowerRight");
        // A line along the top and another along the bottom of the right half: the left is free at the top.
        assert_eq!(corner(&[line(&[(0.5, 1.0), (1.0, 1.0)]), line(&[(0.5, 0.0), (1.0, 0.0)])]), "UpperLeft");
        // Flat in the middle: nothing is covered anywhere, so upper right.
        assert_eq!(corner(&[line(&[(0.0, 0.5), (1.0, 0.5)])]), "UpperRight");
    }
}
