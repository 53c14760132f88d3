//! Image folders (`root/<class>/<image>.{jpg,jpeg,png}`, torchvision's `ImageFolder`), decoded with the `image`
//! crate and preprocessed as torchvision's ImageNet evaluation transform: the shorter side resized to 256
//! (bilinear, antialiased), a centered 224×224 crop, pixels scaled to [0, 1] and normalized with ImageNet's mean and
//! std. Classes are the sub-folders in sorted order, as torchvision numbers them. The images are decoded in
//! parallel and held in memory (150 KB per image), which suits a validation subset for evaluation, calibration
//! and sensitivity analysis; training from a folder needs a streaming loader distill does not have yet.
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use tch::Tensor;

use super::{normalize_pixels, Dataset};
use crate::{Error, Result};

/// ImageNet's per-channel mean and std (torchvision's `Normalize`).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

/// How [`image_folder`] reads a folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFolderOptions {
    /// Read at most this many images, spread evenly over the sorted list so that every class keeps its share.
    pub limit: Option<usize>,
    /// Skip an image that cannot be decoded (each one is reported on stderr) instead of failing.
    pub skip_unreadable: bool,
    /// Side the shorter edge is resized to before the crop (torchvision: 256).
    pub resize: u32,
    /// Side of the centered square crop (224).
    pub crop: u32,
    /// Decoding threads (at least 1).
    pub threads: usize,
}

impl Default for ImageFolderOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        ImageFolderOptions { limit: None, skip_unreadable: false, resize: 256, crop: 224, threads }
    }
}

/// The images of `root` and their labels: `(path, class index)` in sorted order, and the class names.
pub fn list_images(root: &Path) -> Result<(Vec<(PathBuf, i64)>, Vec<String>)> {
    let read_dir = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(d).map_err(|e| Error::io(d, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        Ok(entries)
    };
    let classes: Vec<PathBuf> = read_dir(root)?.into_iter().filter(|p| p.is_dir()).collect();
    if classes.is_empty() {
        return Err(Error::data(root, "no class folders: an image folder holds one sub-folder of images per class (root/<class>/<image>.jpg)"));
    }
    let mut samples = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        for path in read_dir(class)? {
            let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
            if path.is_file() && ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str())) {
                samples.push((path, label as i64));
            }
        }
    }
    if samples.is_empty() {
        return Err(Error::data(root, format!("no .jpg, .jpeg or .png images in its {} class folders", classes.len())));
    }
    let names = classes.iter().map(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect();
    Ok((samples, names))
}

/// One image through the evaluation transform, as `[3, crop, crop]` bytes in channel-major order.
pub fn preprocess(path: &Path, resize: u32, crop: u32) -> Result<Vec<u8>> {
    let img = image::open(path).map_err(|e| Error::data(path, format!("cannot decode the image: {e}")))?.to_rgb8();
    let (w, h) = img.dimensions();
    // torchvision's Resize(256): the shorter side becomes 256, the longer one int(256 · long / short).
    let (nw, nh) = if w <= h { (resize, (resize as u64 * h as u64 / w.max(1) as u64) as u32) } else { ((resize as u64 * w as u64 / h.max(1) as u64) as u32, resize) };
    if nw < crop || nh < crop {
        return Err(Error::data(path, format!("resized to {nw}×{nh}, smaller than the {crop}×{crop} crop")));
    }
    let resized = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
    // CenterCrop: the offset rounds (h − crop) / 2 half to even, as Python's round does.
    let offset = |n: u32| ((n - crop) as f64 / 2.0).round_ties_even() as u32;
    let (left, top) = (offset(nw), offset(nh));
    let mut out = vec![0u8; 3 * (crop * crop) as usize];
    let plane = (crop * crop) as usize;
    for y in 0..crop {
        for x in 0..crop {
            let p = resized.get_pixel(left + x, top + y);
            let i = (y * crop + x) as usize;
            for c in 0..3 {
                out[c * plane + i] = p[c];
            }
        }
    }
    Ok(out)
}

/// Reads the image folder at `root` into a [`Dataset`] preprocessed for evaluation (see the module's text).
///
/// ```no_run
/// use distill::data::{image_folder, ImageFolderOptions};
/// let val = image_folder("imagenet/val", &ImageFolderOptions { limit: Some(5_000), ..Default::default() })?;
/// # Ok::<(), distill::Error>(())
/// ```
pub fn image_folder(root: impl AsRef<Path>, options: &ImageFolderOptions) -> Result<Dataset> {
    let root = root.as_ref();
    if options.limit == Some(0) {
        return Err(Error::invalid("image folder limit", "must be at least 1"));
    }
    let (mut samples, classes) = list_images(root)?;
    if let Some(limit) = options.limit.filter(|&l| l < samples.len()) {
        let n = samples.len();
        samples = (0..limit).map(|i| samples[i * n / limit].clone()).collect();
    }
    let (resize, crop) = (options.resize, options.crop);
    let threads = options.threads.max(1).min(samples.len());
    let chunk = samples.len().div_ceil(threads);
    let decoded: Vec<Result<Option<Vec<u8>>>> = std::thread::scope(|s| {
        let handles: Vec<_> = samples
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(path, _)| match preprocess(path, resize, crop) {
                            Ok(bytes) => Ok(Some(bytes)),
                            Err(e) if options.skip_unreadable => {
                                eprintln!("skipped: {e}");
                                Ok(None)
                            }
                            Err(e) => Err(e),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|_| vec![Err(Error::invalid("image folder", "a decoding thread panicked"))])).collect()
    });
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for (result, (_, label)) in decoded.into_iter().zip(&samples) {
        if let Some(bytes) = result? {
            pixels.extend_from_slice(&bytes);
            labels.push(*label);
        }
    }
    if labels.is_empty() {
        return Err(Error::data(root, "no image could be decoded"));
    }
    let n = labels.len() as i64;
    let images = Tensor::f_from_slice(&pixels)?.f_view([n, 3, crop as i64, crop as i64])?;
    let name = format!("image folder {}", root.display());
    Dataset::new(name, normalize_pixels(&images, &IMAGENET_MEAN, &IMAGENET_STD)?, Tensor::f_from_slice(&labels)?, classes.len() as i64)
}
