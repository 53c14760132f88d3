//! Image folders (`root/<class>/<image>.{jpg,jpeg,png}`, torchvision's `ImageFolder`), decoded with the `image`
//! crate. Classes are the sub-folders in sorted order, as torchvision numbers them. Two ways to read one:
//!
//! * [`image_folder`] decodes every image once, in parallel, through torchvision's ImageNet evaluation transform
//!   (the shorter side resized to 256, bilinear and antialiased; a centered 224×224 crop; pixels scaled to [0, 1]
//!   and normalized with ImageNet's mean and std) and holds the result in memory (150 KB per image): for a
//!   validation subset used for evaluation, calibration and sensitivity analysis.
//! * [`image_folder_streamed`] keeps only the file list and decodes each batch when it is iterated, on worker
//!   threads that read ahead a bounded number of batches: for training on a folder of any size. Training passes
//!   ([`Dataset::train_batches`]) use torchvision's training transform, [`RandomResizedCrop`] and a horizontal
//!   flip, drawn from the pass's seed and each sample's position, so a seed gives the same batches on every run
//!   whatever the threads' timing; evaluation passes use the evaluation transform.
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::RgbImage;
use tch::Tensor;

use super::{normalize_pixels, Dataset, SplitMix64};
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
    /// Streaming ([`image_folder_streamed`]): batches each decoding thread may hold ready ahead of the consumer.
    pub prefetch: usize,
}

impl Default for ImageFolderOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        ImageFolderOptions { limit: None, skip_unreadable: false, resize: 256, crop: 224, threads, prefetch: 2 }
    }
}

impl ImageFolderOptions {
    fn check(&self) -> Result<()> {
        if self.limit == Some(0) {
            return Err(Error::invalid("image folder limit", "must be at least 1"));
        }
        if self.crop == 0 || self.resize < self.crop {
            return Err(Error::invalid("image folder crop", format!("resize {} and crop {} must satisfy 0 < crop ≤ resize", self.resize, self.crop)));
        }
        Ok(())
    }

    /// `samples` thinned to the limit, spread evenly over the sorted list so that every class keeps its share.
    fn limited(&self, samples: Vec<(PathBuf, i64)>) -> Vec<(PathBuf, i64)> {
        match self.limit.filter(|&l| l < samples.len()) {
            Some(limit) => (0..limit).map(|i| samples[i * samples.len() / limit].clone()).collect(),
            None => samples,
        }
    }
}

/// torchvision's `RandomResizedCrop`: a random region covering a `scale` fraction of the image's area with an
/// aspect ratio (width / height) in `ratio`, log-uniformly drawn, resized to `size`×`size` (bilinear,
/// antialiased); then, with `horizontal_flip`, a mirror with probability ½ (`RandomHorizontalFlip`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomResizedCrop {
    /// Side of the output.
    pub size: u32,
    /// Range of the region's area as a fraction of the image's.
    pub scale: (f64, f64),
    /// Range of the region's width / height.
    pub ratio: (f64, f64),
    /// Mirror left-right with probability ½.
    pub horizontal_flip: bool,
}

impl RandomResizedCrop {
    /// torchvision's ImageNet training transform: scale 0.08–1, ratio 3/4–4/3, flipped half the time.
    pub fn imagenet(size: u32) -> Self {
        RandomResizedCrop { size, scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0), horizontal_flip: true }
    }

    fn check(&self) -> Result<()> {
        let (s, r) = (self.scale, self.ratio);
        if self.size == 0 || !(s.0 > 0.0 && s.0 <= s.1 && s.1 <= 1.0) || !(r.0 > 0.0 && r.0 <= r.1 && r.1.is_finite()) {
            return Err(Error::invalid(
                "RandomResizedCrop",
                format!("size {}, scale {s:?} and ratio {r:?}: need size > 0, 0 < scale.0 ≤ scale.1 ≤ 1 and 0 < ratio.0 ≤ ratio.1", self.size),
            ));
        }
        Ok(())
    }

    /// The region `(top, left, height, width)` of a `width`×`height` image, as torchvision's `get_params`: ten
    /// tries at a random area and log-uniform aspect ratio (sides rounded half to even, as Python's `round`),
    /// then the largest centered region whose ratio is within range.
    pub fn region(&self, width: u32, height: u32, rng: &mut SplitMix64) -> (u32, u32, u32, u32) {
        let area = width as f64 * height as f64;
        let (log_lo, log_hi) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target = area * (self.scale.0 + (self.scale.1 - self.scale.0) * rng.next_f64());
            let aspect = (log_lo + (log_hi - log_lo) * rng.next_f64()).exp();
            let w = (target * aspect).sqrt().round_ties_even();
            let h = (target / aspect).sqrt().round_ties_even();
            if w > 0.0 && w <= width as f64 && h > 0.0 && h <= height as f64 {
                let (w, h) = (w as u32, h as u32);
                let top = rng.below((height - h + 1) as u64) as u32;
                let left = rng.below((width - w + 1) as u64) as u32;
                return (top, left, h, w);
            }
        }
        let in_ratio = width as f64 / height as f64;
        let (w, h) = if in_ratio < self.ratio.0 {
            (width, ((width as f64 / self.ratio.0).round_ties_even() as u32).clamp(1, height))
        } else if in_ratio > self.ratio.1 {
            (((height as f64 * self.ratio.1).round_ties_even() as u32).clamp(1, width), height)
        } else {
            (width, height)
        };
        ((height - h) / 2, (width - w) / 2, h, w)
    }

    /// The transform applied to a decoded image, with the region and the flip drawn from `rng`.
    pub fn apply(&self, img: &RgbImage, rng: &mut SplitMix64) -> RgbImage {
        let (top, left, h, w) = self.region(img.width(), img.height(), rng);
        let region = image::imageops::crop_imm(img, left, top, w, h).to_image();
        let mut out = image::imageops::resize(&region, self.size, self.size, FilterType::Triangle);
        if self.horizontal_flip && rng.next_u64() & 1 == 1 {
            image::imageops::flip_horizontal_in_place(&mut out);
        }
        out
    }
}

fn decode(path: &Path) -> Result<RgbImage> {
    Ok(image::open(path).map_err(|e| Error::data(path, format!("cannot decode the image: {e}")))?.to_rgb8())
}

/// An image's bytes in channel-major order, `[3, H, W]`.
fn channel_major(img: &RgbImage) -> Vec<u8> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0u8; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = p[c];
        }
    }
    out
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
    let img = decode(path)?;
    let (w, h) = img.dimensions();
    // torchvision's Resize(256): the shorter side becomes 256, the longer one int(256 · long / short).
    let (nw, nh) = if w <= h { (resize, (resize as u64 * h as u64 / w.max(1) as u64) as u32) } else { ((resize as u64 * w as u64 / h.max(1) as u64) as u32, resize) };
    if nw < crop || nh < crop {
        return Err(Error::data(path, format!("resized to {nw}×{nh}, smaller than the {crop}×{crop} crop")));
    }
    let resized = image::imageops::resize(&img, nw, nh, FilterType::Triangle);
    // CenterCrop: the offset rounds (h − crop) / 2 half to even, as Python's round does.
    let offset = |n: u32| ((n - crop) as f64 / 2.0).round_ties_even() as u32;
    Ok(channel_major(&image::imageops::crop_imm(&resized, offset(nw), offset(nh), crop, crop).to_image()))
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
    options.check()?;
    let (samples, classes) = list_images(root)?;
    let samples = options.limited(samples);
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

/// The image folder at `root` as a [`Dataset`] that decodes its images batch by batch (see the module's text):
/// training passes through `augmentation` (torchvision's [`RandomResizedCrop::imagenet`] for ImageNet training;
/// `None` trains on the evaluation transform), evaluation passes through the evaluation transform of `options`.
/// Only the file list is read here, so an unreadable image shows when its batch is decoded: an error naming the
/// file, or with `skip_unreadable` a note on stderr and a batch one sample shorter.
///
/// ```no_run
/// use distill::data::{image_folder_streamed, ImageFolderOptions, RandomResizedCrop};
/// let train = image_folder_streamed("imagenet/train", &ImageFolderOptions::default(), Some(RandomResizedCrop::imagenet(224)))?;
/// for batch in train.train_batches(256, 1, tch::Device::Cpu)?.take(2) {
///     let (images, labels) = batch?; // [256, 3, 224, 224] normalized, [256]
/// }
/// # Ok::<(), distill::Error>(())
/// ```
pub fn image_folder_streamed(root: impl AsRef<Path>, options: &ImageFolderOptions, augmentation: Option<RandomResizedCrop>) -> Result<Dataset> {
    let root = root.as_ref();
    options.check()?;
    if let Some(a) = &augmentation {
        a.check()?;
    }
    let (samples, classes) = list_images(root)?;
    let (paths, labels): (Vec<PathBuf>, Vec<i64>) = options.limited(samples).into_iter().unzip();
    let files = FolderFiles { paths, options: options.clone(), augmentation };
    Dataset::from_files(format!("image folder {} (streamed)", root.display()), files, Tensor::f_from_slice(&labels)?, classes.len() as i64)
}

/// The files of a streamed image folder and how they are decoded.
#[derive(Debug, Clone)]
pub(crate) struct FolderFiles {
    pub(crate) paths: Vec<PathBuf>,
    pub(crate) options: ImageFolderOptions,
    pub(crate) augmentation: Option<RandomResizedCrop>,
}

impl FolderFiles {
    /// Side of the square images this folder yields.
    pub(crate) fn side(&self, training: bool) -> u32 {
        match (training, &self.augmentation) {
            (true, Some(a)) => a.size,
            _ => self.options.crop,
        }
    }

    /// Decodes the samples `indices` (positions `first..` of the pass): the pixels of those that decoded, in order,
    /// and their indices. `seed` selects the training transform.
    pub(crate) fn decode_batch(&self, indices: &[i64], first: usize, seed: Option<u64>) -> Result<(Vec<u8>, Vec<i64>)> {
        let (mut pixels, mut kept) = (Vec::new(), Vec::with_capacity(indices.len()));
        for (offset, &i) in indices.iter().enumerate() {
            let path = &self.paths[i as usize];
            let decoded = match (seed, &self.augmentation) {
                (Some(seed), Some(a)) => decode(path).map(|img| {
                    // Each sample's draw depends on the pass's seed and its position only.
                    let mut rng = SplitMix64::new(seed ^ ((first + offset) as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
                    channel_major(&a.apply(&img, &mut rng))
                }),
                _ => preprocess(path, self.options.resize, self.options.crop),
            };
            match decoded {
                Ok(bytes) => {
                    pixels.extend_from_slice(&bytes);
                    kept.push(i);
                }
                Err(e) if self.options.skip_unreadable => eprintln!("skipped: {e}"),
                Err(e) => return Err(e),
            }
        }
        Ok((pixels, kept))
    }
}
