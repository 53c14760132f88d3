//! Datasets and batching.
//!
//! * [`mnist_bundled`]: the 5,000 MNIST digits shipped with distill (500 per class), split per class at random
//!   (fixed seed) into 400 training, 50 validation and 50 test digits: 4,000 / 500 / 500, the same everywhere.
//! * [`mnist_idx`]: the standard MNIST IDX files (optionally gzipped), for users who have them.
//! * [`cifar10`]: CIFAR-10, from its binary batches or its Python pickles (`cifar-10-batches-py`).
//! * [`Dataset::synthetic`]: random data of any shape, for benchmarks.
//!
//! * [`image_folder`], [`image_folder_streamed`]: folders of JPEG/PNG images, held in memory or decoded batch by
//!   batch on worker threads.
//!
//! A [`Dataset`] keeps all samples in one tensor, or (streamed) their files; [`Dataset::batches`] walks it in
//! order or in a seeded random order. Images are normalized as Distiller's loaders do (MNIST: mean 0.1307, std 0.3081; CIFAR-10: 0.5, 0.5).
mod cifar;
mod image_folder;
mod mnist;
mod prefetch;
mod rng;

use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};
use image_folder::FolderFiles;
use prefetch::Prefetch;

pub use cifar::{cifar10, cifar10_test};
pub use image_folder::{image_folder, image_folder_streamed, list_images, preprocess, ImageFolderOptions, RandomResizedCrop, IMAGENET_MEAN, IMAGENET_STD};
pub use mnist::{mnist_bundled, mnist_csv, mnist_idx, MNIST_MEAN, MNIST_STD};
pub use rng::{epoch_seed, SplitMix64};

/// Labelled images: `[N, C, H, W]` floats (normalized) held in memory or decoded from files batch by batch, and
/// labels `[N]` (int64) in memory.
#[derive(Debug)]
pub struct Dataset {
    name: String,
    samples: Samples,
    labels: Tensor,
    num_classes: i64,
    augmentation: Option<RandomCrop>,
}

#[derive(Debug)]
enum Samples {
    Memory(Tensor),
    Files(Arc<FolderFiles>),
}

/// Datasets are never changed in place, so a clone shares the image and label storage.
impl Clone for Dataset {
    fn clone(&self) -> Self {
        Dataset {
            name: self.name.clone(),
            samples: match &self.samples {
                Samples::Memory(images) => Samples::Memory(images.shallow_clone()),
                Samples::Files(files) => Samples::Files(files.clone()),
            },
            labels: self.labels.shallow_clone(),
            num_classes: self.num_classes,
            augmentation: self.augmentation,
        }
    }
}

/// Training-time augmentation: pad each image by `padding` pixels of value `fill`, crop it back at a random
/// offset, and mirror it horizontally with probability ½ if `horizontal_flip` (torchvision's `RandomCrop` and
/// `RandomHorizontalFlip`, as Distiller's CIFAR-10 loader uses them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomCrop {
    /// Pixels added on each side before cropping; the largest shift.
    pub padding: i64,
    /// Value of the added pixels, in normalized units (the normalized value of a black pixel).
    pub fill: f64,
    /// Mirror left-right with probability ½.
    pub horizontal_flip: bool,
}

impl RandomCrop {
    /// Crops (and flips) each image of `x`. The draws are made for the `span`'s whole global batch in order and
    /// this batch keeps its own samples' draws, so a data-parallel shard is augmented exactly as the same samples
    /// are in one process.
    fn apply(&self, x: &Tensor, rng: &mut SplitMix64, span: &Span) -> Result<Tensor> {
        let size = x.size();
        let (h, w, p) = (size[2], size[3], self.padding);
        let padded = x.f_pad([p, p, p, p], "constant", Some(self.fill))?;
        let range = (2 * p + 1) as u64;
        let draws: Vec<(i64, i64, bool)> = (0..span.global_len)
            .map(|_| {
                let (dy, dx) = (rng.below(range) as i64, rng.below(range) as i64);
                (dy, dx, self.horizontal_flip && rng.next_u64() & 1 == 1)
            })
            .collect();
        let mut crops = Vec::with_capacity(size[0] as usize);
        for i in 0..size[0] {
            let (dy, dx, flip) = draws[(span.offset + i * span.stride) as usize];
            let crop = padded.f_select(0, i)?.f_narrow(1, dy, h)?.f_narrow(2, dx, w)?;
            crops.push(if flip { crop.f_flip([2])? } else { crop });
        }
        Ok(Tensor::f_stack(&crops, 0)?)
    }
}

/// A rank must lie inside its world.
fn check_shard(rank: usize, world_size: usize) -> Result<()> {
    if world_size == 0 || rank >= world_size {
        return Err(Error::invalid("data shard", format!("rank {rank} of {world_size}")));
    }
    Ok(())
}

/// One mini-batch of a pass: `len` samples from position `start` of the pass's order. In a data-parallel shard
/// the batch is this rank's part of a global batch of `global_len` samples, whose positions `offset`,
/// `offset + stride`, ... it holds.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: i64,
    len: i64,
    global_len: i64,
    offset: i64,
    stride: i64,
}

impl Span {
    fn whole(start: i64, len: i64) -> Span {
        Span { start, len, global_len: len, offset: 0, stride: 1 }
    }
}

/// Training, validation and test sets.
#[derive(Debug)]
pub struct DataSplits {
    /// Data the model is trained on.
    pub train: Dataset,
    /// Held out from training; used each epoch to pick the best checkpoint.
    pub valid: Dataset,
    /// Held out from everything; used once on the final model.
    pub test: Dataset,
}

impl Dataset {
    /// A dataset from images `[N, C, H, W]` and labels `[N]` in `0..num_classes`.
    pub fn new(name: impl Into<String>, images: Tensor, labels: Tensor, num_classes: i64) -> Result<Self> {
        let name = name.into();
        let (is, ls) = (images.size(), labels.size());
        if is.len() != 4 || ls.len() != 1 || is[0] != ls[0] {
            return Err(Error::Shape(format!("dataset '{name}': images must be [N, C, H, W] and labels [N]; got {is:?} and {ls:?}")));
        }
        let images = images.f_to_kind(Kind::Float)?;
        let labels = labels.f_to_kind(Kind::Int64)?;
        if is[0] > 0 {
            let (lo, hi) = (labels.f_min()?.int64_value(&[]), labels.f_max()?.int64_value(&[]));
            if lo < 0 || hi >= num_classes {
                return Err(Error::invalid("labels", format!("dataset '{name}': labels span {lo}..={hi}, expected 0..{num_classes}")));
            }
        }
        Ok(Dataset { name, samples: Samples::Memory(images), labels, num_classes, augmentation: None })
    }

    fn from_files(name: String, files: FolderFiles, labels: Tensor, num_classes: i64) -> Result<Self> {
        Ok(Dataset { name, samples: Samples::Files(Arc::new(files)), labels: labels.f_to_kind(Kind::Int64)?, num_classes, augmentation: None })
    }

    /// Gaussian images with uniformly random labels, from a seed; for benchmarks, where only shapes matter.
    pub fn synthetic(len: usize, sample_shape: [i64; 3], num_classes: i64, seed: u64) -> Result<Self> {
        if num_classes <= 0 || sample_shape.iter().any(|&d| d <= 0) {
            return Err(Error::invalid("synthetic dataset", format!("shape {sample_shape:?} and {num_classes} classes must be positive")));
        }
        let mut rng = SplitMix64::new(seed);
        let numel = len * sample_shape.iter().product::<i64>() as usize;
        let pixels: Vec<f32> = (0..numel).map(|_| rng.next_normal() as f32).collect();
        let labels: Vec<i64> = (0..len).map(|_| rng.below(num_classes as u64) as i64).collect();
        let [c, h, w] = sample_shape;
        let images = Tensor::f_from_slice(&pixels)?.f_reshape([len as i64, c, h, w])?;
        Dataset::new("synthetic", images, Tensor::f_from_slice(&labels)?, num_classes)
    }

    /// The dataset's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of classes.
    pub fn num_classes(&self) -> i64 {
        self.num_classes
    }

    /// Shape of one sample, `[C, H, W]` (for a streamed folder, as evaluation passes yield it).
    pub fn sample_shape(&self) -> Vec<i64> {
        match &self.samples {
            Samples::Memory(images) => images.size()[1..].to_vec(),
            Samples::Files(files) => vec![3, files.side(false) as i64, files.side(false) as i64],
        }
    }

    /// Whether the images are decoded from files as batches are drawn ([`image_folder_streamed`]).
    pub fn is_streamed(&self) -> bool {
        matches!(self.samples, Samples::Files(_))
    }

    /// All images, `[N, C, H, W]`; an error for a streamed dataset, whose images exist only batch by batch.
    pub fn images(&self) -> Result<&Tensor> {
        match &self.samples {
            Samples::Memory(images) => Ok(images),
            Samples::Files(_) => Err(Error::invalid(
                "dataset",
                format!("'{}' decodes its images from files batch by batch; iterate batches() or read it with image_folder() to hold it in memory", self.name),
            )),
        }
    }

    /// All labels, `[N]`.
    pub fn labels(&self) -> &Tensor {
        &self.labels
    }

    /// Samples per class, in class order.
    pub fn class_counts(&self) -> Result<Vec<i64>> {
        let counts = self.labels.f_bincount(None::<Tensor>, self.num_classes)?;
        Ok(Vec::<i64>::try_from(&counts)?)
    }

    /// The samples at `indices`, in that order.
    pub fn subset(&self, name: impl Into<String>, indices: &[i64]) -> Result<Dataset> {
        let n = self.len() as i64;
        if let Some(bad) = indices.iter().find(|&&i| i < 0 || i >= n) {
            return Err(Error::invalid("subset index", format!("{bad} is outside 0..{n}")));
        }
        let idx = Tensor::f_from_slice(indices)?;
        let samples = match &self.samples {
            Samples::Memory(images) => Samples::Memory(images.f_index_select(0, &idx)?),
            Samples::Files(files) => {
                let paths = indices.iter().map(|&i| files.paths[i as usize].clone()).collect();
                Samples::Files(Arc::new(FolderFiles { paths, ..FolderFiles::clone(files) }))
            }
        };
        Ok(Dataset {
            name: name.into(),
            samples,
            labels: self.labels.f_index_select(0, &idx)?,
            num_classes: self.num_classes,
            augmentation: self.augmentation,
        })
    }

    /// Applies `augmentation` to every training pass ([`Dataset::train_batches`]).
    pub fn with_augmentation(mut self, augmentation: Option<RandomCrop>) -> Self {
        self.augmentation = augmentation;
        self
    }

    /// The training-time augmentation, if any.
    pub fn augmentation(&self) -> Option<&RandomCrop> {
        self.augmentation.as_ref()
    }

    /// Number of batches of `batch_size` in one pass (the last one may be short), Distiller's
    /// `steps_per_epoch = ceil(len / batch_size)`.
    pub fn steps(&self, batch_size: usize) -> usize {
        self.len().div_ceil(batch_size.max(1))
    }

    /// Mini-batches of `batch_size` moved to `device`, in order and unaugmented: for evaluation.
    pub fn batches(&self, batch_size: usize, device: Device) -> Result<Batches<'_>> {
        self.make_batches(batch_size, None, None, device)
    }

    /// Mini-batches for one training pass: in a random order and with random augmentation, both fixed by `seed`.
    pub fn train_batches(&self, batch_size: usize, seed: u64, device: Device) -> Result<Batches<'_>> {
        self.make_batches(batch_size, Some(seed), None, device)
    }

    /// Number of global mini-batches of a data-parallel pass over `world_size` ranks: as [`Dataset::steps`], less
    /// a last batch too small to give every rank a sample.
    pub fn shard_steps(&self, batch_size: usize, world_size: usize) -> usize {
        let (n, b) = (self.len(), batch_size.max(1));
        if n % b != 0 && n % b < world_size {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Rank `rank`'s part of the training pass [`Dataset::train_batches`] makes with `batch_size` and `seed`, for
    /// data-parallel training over `world_size` ranks. Of each global mini-batch of `batch_size` samples, the
    /// rank takes those at positions `rank`, `rank + world_size`, ... (PyTorch's `DistributedSampler` order), with
    /// the augmentation they get in one process; so the ranks together see exactly the batches one process sees.
    /// A last global batch with fewer samples than ranks is left out ([`Dataset::shard_steps`]).
    pub fn train_shard_batches(&self, batch_size: usize, seed: u64, rank: usize, world_size: usize, device: Device) -> Result<Batches<'_>> {
        check_shard(rank, world_size)?;
        if batch_size < world_size {
            return Err(Error::invalid("batch size", format!("{batch_size} is smaller than the {world_size} ranks: each rank needs at least one sample of every mini-batch")));
        }
        self.make_batches(batch_size, Some(seed), Some((rank, world_size)), device)
    }

    /// The samples of block `rank` of `world_size` nearly equal contiguous blocks (for sharded evaluation).
    pub fn shard(&self, rank: usize, world_size: usize) -> Result<Dataset> {
        check_shard(rank, world_size)?;
        let n = self.len();
        let (from, to) = (rank * n / world_size, (rank + 1) * n / world_size);
        let indices: Vec<i64> = (from as i64..to as i64).collect();
        self.subset(format!("{} [{rank}/{world_size}]", self.name), &indices)
    }

    fn make_batches(&self, batch_size: usize, seed: Option<u64>, shard: Option<(usize, usize)>, device: Device) -> Result<Batches<'_>> {
        if batch_size == 0 {
            return Err(Error::invalid("batch size", "must be at least 1"));
        }
        let (order, augment) = match seed {
            Some(seed) => {
                let mut rng = SplitMix64::new(seed);
                let order = rng.permutation(self.len());
                (Some(order), self.augmentation.map(|a| (a, rng)))
            }
            None => (None, None),
        };
        let (n, b) = (self.len() as i64, batch_size as i64);
        let (order, spans) = match (shard, order) {
            (Some((rank, world)), Some(global)) => {
                let (rank, world) = (rank as i64, world as i64);
                let mut local = Vec::with_capacity(global.len() / world as usize + 1);
                let mut spans = Vec::new();
                for step in 0..self.shard_steps(batch_size, world as usize) as i64 {
                    let (first, global_len) = (step * b, b.min(n - step * b));
                    let start = local.len() as i64;
                    local.extend((rank..global_len).step_by(world as usize).map(|k| global[(first + k) as usize]));
                    spans.push(Span { start, len: local.len() as i64 - start, global_len, offset: rank, stride: world });
                }
                (Some(local), spans)
            }
            (_, order) => (order, (0..n).step_by(batch_size).map(|start| Span::whole(start, b.min(n - start))).collect()),
        };
        let decoded = match &self.samples {
            Samples::Memory(_) => None,
            Samples::Files(files) => {
                let files = files.clone();
                let order: Vec<i64> = order.clone().unwrap_or_else(|| (0..self.len() as i64).collect());
                let (threads, depth) = (files.options.threads, files.options.prefetch);
                let spans = spans.clone();
                Some(Prefetch::spawn(spans.len(), threads, depth, move |i| {
                    let Span { start, len, .. } = spans[i];
                    files.decode_batch(&order[start as usize..(start + len) as usize], start as usize, seed)
                }))
            }
        };
        let order = order.map(|o| Tensor::f_from_slice(&o)).transpose()?;
        Ok(Batches { dataset: self, order, augment, decoded, spans, next: 0, device })
    }
}

/// Iterator over the mini-batches of a [`Dataset`], yielding `(images, labels)`.
pub struct Batches<'a> {
    dataset: &'a Dataset,
    order: Option<Tensor>,
    augment: Option<(RandomCrop, SplitMix64)>,
    /// A streamed dataset's batches, decoded ahead on worker threads.
    decoded: Option<Prefetch<Result<(Vec<u8>, Vec<i64>)>>>,
    spans: Vec<Span>,
    next: usize,
    device: Device,
}

impl Batches<'_> {
    fn batch(&mut self, span: Span) -> Result<(Tensor, Tensor)> {
        let Span { start, len, .. } = span;
        let d = self.dataset;
        let (x, y) = match (&d.samples, &mut self.decoded, &self.order) {
            (Samples::Files(files), Some(decoded), _) => {
                let decoded = decoded.next().ok_or_else(|| Error::invalid("data loading", "the decoded batches ended early"))?;
                let (pixels, kept) = decoded??;
                if kept.is_empty() {
                    return Err(Error::data(Path::new(&d.name), format!("no image of the batch at sample {start} could be decoded")));
                }
                let side = files.side(self.order.is_some()) as i64;
                let pixels = Tensor::f_from_slice(&pixels)?.f_view([kept.len() as i64, 3, side, side])?;
                let x = normalize_pixels(&pixels, &IMAGENET_MEAN, &IMAGENET_STD)?;
                (x, d.labels.f_index_select(0, &Tensor::f_from_slice(&kept)?)?)
            }
            (Samples::Memory(images), _, Some(order)) => {
                let idx = order.f_narrow(0, start, len)?;
                (images.f_index_select(0, &idx)?, d.labels.f_index_select(0, &idx)?)
            }
            (Samples::Memory(images), _, None) => (images.f_narrow(0, start, len)?, d.labels.f_narrow(0, start, len)?),
            (Samples::Files(_), None, _) => return Err(Error::invalid("data loading", "a streamed dataset's batches were not started")),
        };
        let x = match &mut self.augment {
            Some((crop, rng)) => crop.apply(&x, rng, &span)?,
            None => x,
        };
        Ok((x.f_to_device(self.device)?, y.f_to_device(self.device)?))
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<(Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        let span = *self.spans.get(self.next)?;
        self.next += 1;
        Some(self.batch(span))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.spans.len() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Batches<'_> {}

/// Splits `dataset` per class: the samples of each class, in the order given by a permutation drawn from
/// `seed`, go `per_class[0]` to the first set, the next `per_class[1]` to the second, and so on. Every set keeps
/// the dataset's order.
pub fn split_per_class(dataset: &Dataset, per_class: &[usize], names: &[&str], seed: u64) -> Result<Vec<Dataset>> {
    let labels = Vec::<i64>::try_from(&dataset.labels)?;
    let mut seen = vec![0usize; dataset.num_classes as usize];
    let mut parts: Vec<Vec<i64>> = vec![Vec::new(); per_class.len()];
    let order = SplitMix64::new(seed).permutation(labels.len());
    let mut ranked: Vec<usize> = vec![0; labels.len()];
    for (rank, &i) in order.iter().enumerate() {
        ranked[i as usize] = rank;
    }
    let mut by_rank: Vec<usize> = (0..labels.len()).collect();
    by_rank.sort_by_key(|&i| ranked[i]);
    for &i in &by_rank {
        let l = labels[i];
        let k = seen[l as usize];
        seen[l as usize] += 1;
        let mut bound = 0;
        for (part, &count) in per_class.iter().enumerate() {
            bound += count;
            if k < bound {
                parts[part].push(i as i64);
                break;
            }
        }
    }
    let needed: usize = per_class.iter().sum();
    if let Some((class, &have)) = seen.iter().enumerate().find(|(_, &s)| s < needed) {
        return Err(Error::invalid(
            "per-class split",
            format!("class {class} of '{}' has {have} samples, the split needs {needed}", dataset.name),
        ));
    }
    parts.iter_mut().zip(names).map(|(idx, name)| {
        idx.sort_unstable();
        dataset.subset(*name, idx)
    }).collect()
}

/// Normalizes `u8` pixels (`[N, C, H, W]`) to `(x/255 - mean[c]) / std[c]`.
fn normalize_pixels(pixels: &Tensor, mean: &[f64], std: &[f64]) -> Result<Tensor> {
    let c = mean.len() as i64;
    let mean = Tensor::f_from_slice(mean)?.f_to_kind(Kind::Float)?.f_view([1, c, 1, 1])?;
    let std = Tensor::f_from_slice(std)?.f_to_kind(Kind::Float)?.f_view([1, c, 1, 1])?;
    Ok(pixels.f_to_kind(Kind::Float)?.f_div_scalar(255.0)?.f_sub(&mean)?.f_div(&std)?)
}

/// Reads a file, inflating it if it is gzip-compressed.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    maybe_gunzip(path, raw)
}

/// Inflates `raw` if it starts with the gzip magic bytes; `origin` names it in errors.
fn maybe_gunzip(origin: &std::path::Path, raw: Vec<u8>) -> Result<Vec<u8>> {
    use std::io::Read;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| Error::data(origin, format!("corrupt gzip stream: {e}")))?;
    Ok(out)
}
