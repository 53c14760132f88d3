//! The main job: train LeNet-5 on the bundled MNIST digits with cosine-annealed SGD, through the library API,
//! and write checkpoints, metrics.csv and summary.json to `runs/lenet` (or the folder given as argument).
//!
//! ```text
//! cargo run --release --example lenet_mnist [OUT_DIR]
//! ```
use distill::prelude::*;
use distill::scheduler::lr::{LrPolicy, LrSchedule};

fn main() -> distill::Result<()> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "runs/lenet".into());
    let epochs = 10;
    tch::manual_seed(1);
    let data = distill::data::mnist_bundled()?;
    let mut model = create_model("lenet", "mnist", Device::cuda_if_available())?;
    println!("{model}");

    let mut scheduler = CompressionScheduler::new(&model);
    let cosine = LrPolicy::new(LrSchedule::CosineAnnealingLR { t_max: epochs, eta_min: 0.0 })?;
    scheduler.add_policy(Box::new(cosine), PolicySchedule::range(0, epochs, 1)?);

    let config = TrainConfig { epochs, lr: 0.02, batch_size: 32, seed: 1, out_dir: Some(out.clone().into()), ..TrainConfig::default() };
    let summary = distill::train::fit(&mut model, &data, Some(&mut scheduler), &config)?;
    println!(
        "LeNet-5 on {} bundled MNIST digits: test top-1 {:.2}% (top-5 {:.2}%), best validation top-1 {:.2}% at epoch {}, {} parameters, {:.1} s; results in {out}/",
        data.train.len(),
        summary.test.top1,
        summary.test.top5,
        summary.best.top1,
        summary.best.epoch,
        summary.params,
        summary.wall_seconds
    );
    Ok(())
}
