//! Image folders: a generated folder of PNG and JPEG images loads with torchvision's class numbering and the
//! ImageNet evaluation transform; streamed, it gives the same evaluation images, seeded training crops that do
//! not depend on the thread count, and trains a model; limits, unreadable images and empty folders behave as
//! documented; and (with a Python that has torchvision, `DISTILL_TORCH_PYTHON`) one image's preprocessing is
//! compared with torchvision's.
use std::path::Path;

use distill::data::{image_folder, image_folder_streamed, Dataset, ImageFolderOptions, RandomResizedCrop, SplitMix64, IMAGENET_MEAN, IMAGENET_STD};
use image::{ImageBuffer, Rgb};

const CLASSES: [(&str, [u8; 3]); 3] = [("cat", [200, 30, 30]), ("dog", [30, 200, 30]), ("eel", [30, 30, 200])];

/// `per_class` solid-colour images per class, alternating PNG and JPEG and three sizes (landscape, portrait,
/// square).
fn make_folder(root: &Path, per_class: usize) {
    for (class, color) in CLASSES {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let (w, h) = [(300, 250), (250, 300), (256, 256)][i % 3];
            let img: ImageBuffer<Rgb<u8>, Vec<u8>> = ImageBuffer::from_pixel(w, h, Rgb(color));
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            img.save(dir.join(format!("{i:03}.{ext}"))).unwrap();
        }
    }
}

#[test]
fn a_folder_loads_with_sorted_classes_and_the_evaluation_transform() {
    let dir = distill::io::TempDir::new().unwrap();
    make_folder(dir.path(), 40);
    std::fs::write(dir.path().join("README.txt"), "not a class").unwrap();
    std::fs::write(dir.path().join("cat").join("notes.txt"), "not an image").unwrap();
    let set = image_folder(dir.path(), &ImageFolderOptions::default()).unwrap();
    assert_eq!((set.len(), set.num_classes()), (120, 3));
    assert_eq!(set.images().unwrap().size(), [120, 3, 224, 224]);
    let labels = Vec::<i64>::try_from(set.labels()).unwrap();
    assert_eq!(labels, [vec![0; 40], vec![1; 40], vec![2; 40]].concat());
    // A solid PNG stays solid through resize and crop: every value is exactly the normalized colour.
    for (label, (_, color)) in CLASSES.iter().enumerate() {
        let img = set.images().unwrap().get(label as i64 * 40);
        for c in 0..3 {
            let want = (color[c] as f64 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            let plane = img.get(c as i64);
            let (lo, hi) = (plane.min().double_value(&[]), plane.max().double_value(&[]));
            assert!((lo - want).abs() < 1e-5 && (hi - want).abs() < 1e-5, "class {label} channel {c}: {lo}..{hi}, want {want}");
        }
    }
    // A limit spreads over the classes.
    let few = image_folder(dir.path(), &ImageFolderOptions { limit: Some(30), ..Default::default() }).unwrap();
    let labels = Vec::<i64>::try_from(few.labels()).unwrap();
    assert_eq!((0..3).map(|c| labels.iter().filter(|&&l| l == c).count()).collect::<Vec<_>>(), [10, 10, 10]);
}

#[test]
fn unreadable_images_and_empty_folders_are_clear() {
    let dir = distill::io::TempDir::new().unwrap();
    make_folder(dir.path(), 3);
    let bad = dir.path().join("dog").join("broken.jpg");
    std::fs::write(&bad, b"\xff\xd8 not really a jpeg").unwrap();
    let err = image_folder(dir.path(), &ImageFolderOptions::default()).unwrap_err().to_string();
    assert!(err.contains("broken.jpg") && err.contains("cannot decode"), "{err}");
    let set = image_folder(dir.path(), &ImageFolderOptions { skip_unreadable: true, ..Default::default() }).unwrap();
    assert_eq!(set.len(), 9);
    let err = image_folder(dir.path(), &ImageFolderOptions { limit: Some(0), ..Default::default() }).unwrap_err().to_string();
    assert!(err.contains("limit") && err.contains("at least 1"), "{err}");
    let empty = distill::io::TempDir::new().unwrap();
    let err = image_folder(empty.path(), &ImageFolderOptions::default()).unwrap_err().to_string();
    assert!(err.contains("no class folders"), "{err}");
    std::fs::create_dir(empty.path().join("cat")).unwrap();
    let err = image_folder(empty.path(), &ImageFolderOptions::default()).unwrap_err().to_string();
    assert!(err.contains("no .jpg, .jpeg or .png images"), "{err}");
    let err = image_folder(empty.path().join("missing"), &ImageFolderOptions::default()).unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
}

/// A textured PNG through distill's transform and torchvision's (PIL decoding, `Resize(256)`, `CenterCrop(224)`,
/// `ToTensor`, `Normalize`). Needs `DISTILL_TORCH_PYTHON`; CI skips it.
#[test]
fn preprocessing_matches_torchvision() {
    let Ok(python) = std::env::var("DISTILL_TORCH_PYTHON") else {
        eprintln!("skipped: set DISTILL_TORCH_PYTHON to a Python with torch and torchvision to run it");
        return;
    };
    let dir = distill::io::TempDir::new().unwrap();
    let class = dir.path().join("only");
    std::fs::create_dir(&class).unwrap();
    let img: ImageBuffer<Rgb<u8>, Vec<u8>> = ImageBuffer::from_fn(333, 287, |x, y| {
        Rgb([((x * 7 + y * 3) % 256) as u8, ((x * x + y) % 251) as u8, (((x / 9 + y / 11) % 2) * 255) as u8])
    });
    let png = class.join("texture.png");
    img.save(&png).unwrap();
    let out = dir.path().join("torchvision.pth");
    let script = "import sys, torch\nfrom PIL import Image\nfrom torchvision import transforms as T\n\
        t = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])\n\
        torch.save({'image': t(Image.open(sys.argv[1]).convert('RGB'))}, sys.argv[2])\n";
    let status = std::process::Command::new(python).args(["-c", script, png.to_str().unwrap(), out.to_str().unwrap()]).status().unwrap();
    assert!(status.success());
    let theirs = distill::train::Checkpoint::load(&out).unwrap().model.remove(0).1;
    let ours = image_folder(dir.path(), &ImageFolderOptions::default()).unwrap().images().unwrap().get(0);
    let diff = (&ours - &theirs).abs();
    // In 8-bit levels: a normalized difference times std times 255.
    let levels = |t: &tch::Tensor| t.double_value(&[]) * 0.226 * 255.0;
    let (mean, max) = (levels(&diff.mean(tch::Kind::Double)), levels(&diff.max()));
    println!("distill vs torchvision: mean {mean:.3} levels, max {max:.1} levels of 255");
    // Measured: mean 0.175, max 1.0 level (PIL resamples in 8-bit fixed point, the image crate in floats).
    assert!(mean < 0.5 && max <= 1.5, "mean {mean} max {max} levels");
}

/// Textured images (no two alike) of three sizes, `per_class` per class.
fn make_textured_folder(root: &Path, per_class: u32) {
    for (k, (class, _)) in CLASSES.iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let (w, h) = [(90, 70), (70, 90), (80, 80)][i as usize % 3];
            let seed = k as u32 * 31 + i;
            let img: ImageBuffer<Rgb<u8>, Vec<u8>> = ImageBuffer::from_fn(w, h, |x, y| Rgb([((x * 5 + seed * 17) % 256) as u8, ((y * 3 + seed) % 256) as u8, ((x * y + seed) % 256) as u8]));
            img.save(dir.join(format!("{i:03}.png"))).unwrap();
        }
    }
}

fn concat(batches: impl Iterator<Item = distill::Result<(tch::Tensor, tch::Tensor)>>) -> (tch::Tensor, tch::Tensor) {
    let (xs, ys): (Vec<_>, Vec<_>) = batches.map(|b| b.unwrap()).unzip();
    (tch::Tensor::cat(&xs, 0), tch::Tensor::cat(&ys, 0))
}

#[test]
fn a_streamed_folder_gives_the_same_evaluation_images_and_seeded_training_crops() {
    let dir = distill::io::TempDir::new().unwrap();
    make_textured_folder(dir.path(), 9);
    let options = |threads| ImageFolderOptions { resize: 64, crop: 56, threads, prefetch: 1, ..Default::default() };
    let crop = RandomResizedCrop::imagenet(48);
    let streamed = image_folder_streamed(dir.path(), &options(2), Some(crop)).unwrap();
    assert!(streamed.is_streamed() && streamed.len() == 27 && streamed.num_classes() == 3);
    assert_eq!(streamed.sample_shape(), [3, 56, 56]);
    assert!(streamed.images().unwrap_err().to_string().contains("decodes its images from files batch by batch"));
    // Evaluation passes: exactly the images image_folder holds in memory, in the same order.
    let memory = image_folder(dir.path(), &options(2)).unwrap();
    let (x, y) = concat(streamed.batches(5, tch::Device::Cpu).unwrap());
    assert!(x.equal(memory.images().unwrap()) && y.equal(memory.labels()));
    // Training passes: a seed fixes order and crops whatever the thread count; every sample once per pass.
    let pass = |set: &Dataset, seed| concat(set.train_batches(4, seed, tch::Device::Cpu).unwrap());
    let (a, la) = pass(&streamed, 7);
    let one_thread = image_folder_streamed(dir.path(), &options(1), Some(crop)).unwrap();
    let (b, lb) = pass(&one_thread, 7);
    let (c, _) = pass(&streamed, 8);
    assert_eq!(a.size(), [27, 3, 48, 48]);
    assert!(a.equal(&b) && la.equal(&lb), "the same seed gives the same batches with 1 or 2 threads");
    assert!(!a.equal(&c), "another seed, other crops");
    assert!(la.sort(0, false).0.equal(memory.labels()), "a permutation of the labels");
    // A subset streams its own files; stopping early is fine.
    let part = streamed.subset("part", &[26, 0]).unwrap();
    let (x, y) = concat(part.batches(8, tch::Device::Cpu).unwrap());
    assert!(x.equal(&memory.images().unwrap().index_select(0, &tch::Tensor::from_slice(&[26i64, 0]))));
    assert_eq!(Vec::<i64>::try_from(&y).unwrap(), [2, 0]);
    assert_eq!(streamed.train_batches(2, 1, tch::Device::Cpu).unwrap().take(1).count(), 1);
}

#[test]
fn random_resized_crop_regions_follow_torchvision() {
    let mut rng = SplitMix64::new(3);
    // Too narrow for any try (area ≥ 8% of 10,000 needs a side ≥ 24 > 10): the centered 4/3 fallback.
    let t = RandomResizedCrop::imagenet(224);
    assert_eq!(t.region(1000, 10, &mut rng), (0, 493, 10, 13));
    assert_eq!(t.region(10, 1000, &mut rng), (493, 0, 13, 10));
    // A fixed quarter-area square: 20×20 anywhere in 40×40.
    let square = RandomResizedCrop { size: 8, scale: (0.25, 0.25), ratio: (1.0, 1.0), horizontal_flip: false };
    for _ in 0..50 {
        let (top, left, h, w) = square.region(40, 40, &mut rng);
        assert!((h, w) == (20, 20) && top <= 20 && left <= 20);
    }
    // The ImageNet ranges on a 500×375 image: every region inside, area 8–100%, ratio 3/4–4/3 (up to the rounding
    // of the sides), and the areas spread over the range.
    let mut fractions = Vec::new();
    for _ in 0..2000 {
        let (top, left, h, w) = t.region(500, 375, &mut rng);
        assert!(top + h <= 375 && left + w <= 500 && h > 0 && w > 0);
        let (area, ratio) = ((h * w) as f64 / (500.0 * 375.0), w as f64 / h as f64);
        assert!((0.079..=1.0).contains(&area), "area {area}");
        assert!(ratio >= 0.75 * (1.0 - 1.0 / h as f64) - 1e-9 && ratio <= 4.0 / 3.0 * (1.0 + 1.0 / h as f64) + 1e-9, "ratio {ratio} of {w}×{h}");
        fractions.push(area);
    }
    let mean = fractions.iter().sum::<f64>() / fractions.len() as f64;
    assert!(fractions.iter().any(|&a| a < 0.15) && fractions.iter().any(|&a| a > 0.9) && (0.4..0.6).contains(&mean), "mean area {mean}");
    // Flips: a left-red, right-blue square cropped whole comes out mirrored about half the time.
    let img: ImageBuffer<Rgb<u8>, Vec<u8>> = ImageBuffer::from_fn(32, 32, |x, _| if x < 16 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
    let whole = RandomResizedCrop { size: 16, scale: (1.0, 1.0), ratio: (1.0, 1.0), horizontal_flip: true };
    let flipped = (0..400).filter(|_| whole.apply(&img, &mut rng).get_pixel(0, 0)[2] == 255).count();
    assert!((150..250).contains(&flipped), "{flipped} of 400 flipped");
    let bad = RandomResizedCrop { scale: (0.5, 0.2), ..t };
    let err = image_folder_streamed("/nonexistent", &ImageFolderOptions::default(), Some(bad)).unwrap_err().to_string();
    assert!(err.contains("0 < scale.0 ≤ scale.1 ≤ 1"), "{err}");
}

#[test]
fn a_model_trains_on_a_streamed_folder_and_bad_images_are_reported() {
    let dir = distill::io::TempDir::new().unwrap();
    make_textured_folder(dir.path(), 8);
    let options = ImageFolderOptions { resize: 36, crop: 32, threads: 2, ..Default::default() };
    let train = image_folder_streamed(dir.path(), &options, Some(RandomResizedCrop::imagenet(32))).unwrap();
    tch::manual_seed(0);
    let mut model = distill::models::create_model("simplenet_cifar", "cifar10", tch::Device::Cpu).unwrap();
    let mut optimizer = distill::optim::Optimizer::for_model(&model, distill::optim::OptimizerConfig::sgd(0.9, 0.0), 0.01).unwrap();
    let settings = distill::train::EpochSettings::quiet(6, 1);
    let metrics = distill::train::train_epoch(&mut model, &train, &mut optimizer, None, 0, settings).unwrap();
    assert!(metrics.objective.loss.is_finite() && train.steps(6) == 4, "{metrics:?}");
    let valid = distill::train::validate(&mut model, &train, 10).unwrap();
    assert!(valid.loss.is_finite());
    // An undecodable file: an error naming it when its batch is drawn, or skipped and reported.
    std::fs::write(dir.path().join("dog").join("broken.png"), b"not a png").unwrap();
    let broken = image_folder_streamed(dir.path(), &options, None).unwrap();
    let err = broken.batches(5, tch::Device::Cpu).unwrap().find_map(|b| b.err()).unwrap().to_string();
    assert!(err.contains("broken.png") && err.contains("cannot decode"), "{err}");
    let skipping = image_folder_streamed(dir.path(), &ImageFolderOptions { skip_unreadable: true, ..options }, None).unwrap();
    let (x, _) = concat(skipping.train_batches(5, 2, tch::Device::Cpu).unwrap());
    assert_eq!(x.size(), [24, 3, 32, 32], "25 files, one skipped");
}
