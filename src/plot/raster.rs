//! The PNG backend: plotters' bitmap backend with text drawn by distill.
//!
//! plotters 0.3.7 rasterizes text through ab_glyph but places each glyph without its left side bearing and from a
//! baseline guessed as half the font size, so in a PNG a "." floats at mid height beside the digit before it
//! ("90·0") and letters crowd or gap ("le net"). SVG output is unaffected (the viewer lays the text out). Here every
//! glyph is laid out by its advance, kerning and side bearing on one baseline at the font's ascent, as a text
//! renderer does, and the rest of the drawing is the bitmap backend's own.
use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use plotters::prelude::*;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind};

/// A bitmap backend whose text is laid out glyph by glyph (see the module's documentation).
pub(crate) struct PngBackend<'a> {
    inner: BitMapBackend<'a>,
    font: FontRef<'static>,
}

type DrawResult<E> = Result<(), DrawingErrorKind<E>>;
type BitmapError = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

impl<'a> PngBackend<'a> {
    pub(crate) fn new(inner: BitMapBackend<'a>, font: &'static [u8]) -> crate::Result<Self> {
        let font = FontRef::try_from_slice(font).map_err(|_| crate::Error::Table("the embedded font could not be loaded".into()))?;
        Ok(PngBackend { inner, font })
    }

    /// The scale at which an em is `size` pixels, as an SVG viewer draws `font-size: size`.
    fn scale(&self, size: f64) -> PxScale {
        let em = self.font.units_per_em().unwrap_or(2048.0);
        PxScale::from((size as f32) * self.font.height_unscaled() / em)
    }

    /// Each glyph of `text` with its pen position: (glyph, x of its origin), and the whole advance.
    fn layout(&self, text: &str, scale: PxScale) -> (Vec<(ab_glyph::GlyphId, f32)>, f32) {
        let font = self.font.as_scaled(scale);
        let (mut x, mut previous) = (0.0f32, None);
        let mut glyphs = Vec::with_capacity(text.len());
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = previous {
                x += font.kern(p, id);
            }
            glyphs.push((id, x));
            x += font.h_advance(id);
            previous = Some(id);
        }
        (glyphs, x)
    }

    /// Width and height of `text`'s box: its advance, and ascent minus descent.
    fn text_box(&self, text: &str, size: f64) -> (i32, i32) {
        let scale = self.scale(size);
        let font = self.font.as_scaled(scale);
        let (_, width) = self.layout(text, scale);
        (width.ceil() as i32, (font.ascent() - font.descent()).ceil() as i32)
    }
}

impl DrawingBackend for PngBackend<'_> {
    type ErrorType = BitmapError;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> DrawResult<Self::ErrorType> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> DrawResult<Self::ErrorType> {
        self.inner.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> DrawResult<Self::ErrorType> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(&mut self, from: BackendCoord, to: BackendCoord, style: &S) -> DrawResult<Self::ErrorType> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(&mut self, upper_left: BackendCoord, bottom_right: BackendCoord, style: &S, fill: bool) -> DrawResult<Self::ErrorType> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(&mut self, path: I, style: &S) -> DrawResult<Self::ErrorType> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(&mut self, center: BackendCoord, radius: u32, style: &S, fill: bool) -> DrawResult<Self::ErrorType> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(&mut self, vert: I, style: &S) -> DrawResult<Self::ErrorType> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(&mut self, pos: BackendCoord, size: (u32, u32), src: &[u8]) -> DrawResult<Self::ErrorType> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<S: BackendTextStyle>(&self, text: &str, style: &S) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let (w, h) = self.text_box(text, style.size());
        Ok((w.max(0) as u32, h.max(0) as u32))
    }

    fn draw_text<S: BackendTextStyle>(&mut self, text: &str, style: &S, pos: BackendCoord) -> DrawResult<Self::ErrorType> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let scale = self.scale(style.size());
        let ascent = self.font.as_scaled(scale).ascent();
        let (width, height) = self.text_box(text, style.size());
        // The anchor, as plotters places a text box, then the rotation about `pos`.
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let transform = style.transform();
        let (w, h) = self.get_size();
        let (glyphs, _) = self.layout(text, scale);
        for (id, x) in glyphs {
            let Some(outline) = self.font.outline_glyph(id.with_scale_and_position(scale, point(x, ascent))) else { continue };
            let bounds = outline.px_bounds();
            let mut pixels = Vec::new();
            outline.draw(|gx, gy, coverage| pixels.push((bounds.min.x as i32 + gx as i32, bounds.min.y as i32 + gy as i32, coverage)));
            for (gx, gy, coverage) in pixels {
                if coverage <= 0.0 {
                    continue;
                }
                let (tx, ty) = transform.transform(gx + dx, gy + dy);
                let (px, py) = (pos.0 + tx, pos.1 + ty);
                if px >= 0 && py >= 0 && (px as u32) < w && (py as u32) < h {
                    let ink = BackendColor { alpha: color.alpha * coverage.min(1.0) as f64, rgb: color.rgb };
                    self.inner.draw_pixel((px, py), ink)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows and columns holding ink (any channel below 128) in an RGB buffer of `width` columns.
    fn ink(rgb: &[u8], width: usize) -> Vec<(usize, usize)> {
        rgb.chunks(3).enumerate().filter(|(_, p)| p.iter().any(|&c| c < 128)).map(|(i, _)| (i / width, i % width)).collect()
    }

    fn render(text: &str) -> (Vec<(usize, usize)>, usize) {
        let (w, h) = (200usize, 60usize);
        let mut rgb = vec![255u8; w * h * 3];
        // plotters' own text drawing needs the font registered; this backend does not.
        super::super::register_font().unwrap();
        {
            let mut backend = PngBackend::new(BitMapBackend::with_buffer(&mut rgb, (w as u32, h as u32)), super::super::FONT).unwrap();
            // The size of a chart's tick labels and legends.
            let style = TextStyle::from(("sans-serif", 13).into_font()).color(&BLACK);
            backend.draw_text(text, &style, (10, 10)).unwrap();
            backend.present().unwrap();
        }
        (ink(&rgb, w), w)
    }

    /// Runs of adjacent columns holding ink: the glyphs, left to right.
    fn glyph_runs(pixels: &[(usize, usize)]) -> Vec<(usize, usize)> {
        let mut columns: Vec<usize> = pixels.iter().map(|p| p.1).collect();
        columns.sort_unstable();
        columns.dedup();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for c in columns {
            match runs.last_mut() {
                Some(r) if c == r.1 + 1 => r.1 = c,
                _ => runs.push((c, c)),
            }
        }
        runs
    }

    /// The dot of "0.0" sits on its digits' baseline, and as far from the digit before it as from the one after
    /// (plotters' own text drawing put it at mid height, against the first digit; this test fails there).
    #[test]
    fn a_decimal_point_sits_on_the_baseline_between_its_digits() {
        let (pixels, width) = render("0.0");
        let runs = glyph_runs(&pixels);
        assert_eq!(runs.len(), 3, "two digits and a dot, apart: {runs:?} (of {width} columns)");
        let rows = |(a, b): (usize, usize)| {
            let r: Vec<usize> = pixels.iter().filter(|p| p.1 >= a && p.1 <= b).map(|p| p.0).collect();
            (*r.iter().min().unwrap(), *r.iter().max().unwrap())
        };
        let (digit, dot) = (rows(runs[0]), rows(runs[1]));
        assert!(dot.1.abs_diff(digit.1) <= 1, "the dot ends on the digits' baseline: dot rows {dot:?}, digit rows {digit:?}");
        let (before, after) = (runs[1].0 - runs[0].1, runs[2].0 - runs[1].1);
        assert!(before.abs_diff(after) <= 1, "gaps beside the dot: {before} and {after} px");
    }
}
