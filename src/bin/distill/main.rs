//! The `distill` command line: the counterpart of Distiller's `compress_classifier.py`.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use distill::config::Schedule;
use distill::data::{self, DataSplits};
use distill::models;
use distill::optim::OptimizerConfig;
use distill::scheduler::lr::{LrPolicy, LrSchedule};
use distill::train::{self, Progress, TrainConfig, Trainer};
use distill::Result;

#[derive(Parser)]
#[command(name = "distill", version, about = "Neural-network compression: train, prune, quantize and analyze models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model of the zoo, writing checkpoints, metrics.csv and summary.json to --out.
    Train(TrainArgs),
    /// List the model zoo's architectures by dataset.
    Models,
    /// Evaluate a checkpoint (distill's, PyTorch's or Distiller's) on a split: top-1, top-5, loss, per-class accuracy.
    Eval(EvalArgs),
    /// Convert a PyTorch or Distiller checkpoint (.pth, .pth.tar) or a bare state dict into a distill checkpoint.
    Convert(ConvertArgs),
    /// Post-training quantization of a trained checkpoint, with calibration, integer export and evaluation.
    Quantize(QuantizeArgs),
    /// Print a model summary: weight sparsity, compute (MACs), modules, or masks.
    Summary(SummaryArgs),
    /// Remove a checkpoint's zero filters and channels for good (Distiller's --thinnify), writing a smaller one.
    Thin(ThinArgs),
    /// Export a model (dense, masked, thinned, or post-training quantized in QDQ form) to ONNX.
    Export(ExportArgs),
    /// Measure the same model as dense, masked, thinned and quantized variants in onnxruntime and libtorch:
    /// file size, latency, accuracy, with a table, a chart and plain verdicts.
    DeployReport(DeployReportArgs),
    /// Sensitivity analysis: prune each tensor alone at each level and evaluate.
    Sensitivity(SensitivityArgs),
    /// Read the TensorBoard and CSV logs of runs into one table.
    Logs(LogsArgs),
    /// Check or preview compression schedules.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
}

/// The model, its data and the device: shared by `train` and `quantize`.
#[derive(clap::Args)]
struct ModelArgs {
    /// Architecture (see `distill models`).
    #[arg(long)]
    arch: String,
    /// Dataset: mnist (the bundled 5,000 digits unless --data-dir is given), cifar10 or imagenet (both need --data-dir).
    #[arg(long)]
    dataset: String,
    /// Folder with the full MNIST IDX files, the CIFAR-10 batches (binary or Python), or ImageNet as image folders:
    /// DIR/val/<class>/<image>.jpg (held in memory) and, for training, DIR/train/<class>/... (streamed).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// imagenet: read at most this many validation images (spread over the classes); they are held in memory,
    /// 150 KB each.
    #[arg(long)]
    data_limit: Option<usize>,
}

impl ModelArgs {
    /// A freshly initialized model of the zoo on the requested device.
    fn model(&self) -> Result<distill::nn::Model> {
        models::create_model(&self.arch, &self.dataset, train::parse_device(&self.device)?)
    }

    /// The dataset's splits.
    fn data(&self) -> Result<DataSplits> {
        load_data(&self.dataset, self.data_dir.as_ref(), self.data_limit)
    }

    /// The `wanted` splits, in that order. When only the test split is wanted, CIFAR-10 reads its test file
    /// alone, so evaluating or quantizing works without the five training files.
    fn splits(&self, wanted: &[Split]) -> Result<Vec<distill::data::Dataset>> {
        if let ("cifar10", Some(dir), true) = (self.dataset.as_str(), &self.data_dir, wanted.iter().all(|s| matches!(s, Split::Test))) {
            let test = data::cifar10_test(dir)?;
            return Ok(wanted.iter().map(|_| test.clone()).collect());
        }
        let data = self.data()?;
        Ok(wanted
            .iter()
            .map(|s| match s {
                Split::Train => data.train.clone(),
                Split::Valid => data.valid.clone(),
                Split::Test => data.test.clone(),
            })
            .collect())
    }
}

#[derive(clap::Args)]
struct QuantizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Trained checkpoint.
    #[arg(long)]
    checkpoint: PathBuf,
    /// YAML with one PostTrainLinearQuantizer in its `quantizers:` section.
    #[arg(long)]
    config: PathBuf,
    /// Calibrate static activation ranges on this many batches of --calibrate-split (0: use the config's
    /// statistics file, or dynamic ranges if it has none).
    #[arg(long, default_value_t = 0)]
    calibrate: usize,
    /// The split calibration batches come from. Distiller calibrates on the test set; distill's default keeps
    /// the test set out of every choice. With `test`, CIFAR-10 needs only its test file.
    #[arg(long, value_enum, default_value_t = Split::Valid)]
    calibrate_split: Split,
    /// Mini-batch size for calibration (default: --batch-size).
    #[arg(long)]
    calibration_batch_size: Option<usize>,
    /// Mini-batch size for evaluation.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Cross-layer equalization before calibrating and quantizing (as the config's
    /// `cross_layer_equalization: true`).
    #[arg(long)]
    equalize: bool,
    /// Bias correction (Nagel et al. 2019): each quantized layer's bias absorbs the mean output shift its weight
    /// quantization causes, measured on the calibration batches (empirical, the default; needs --calibrate) or
    /// computed from the batch norm before the layer (analytical, no data).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "empirical")]
    bias_correction: Option<BiasCorrectionArg>,
    /// AdaRound (Nagel et al. 2020): learn, layer by layer on the calibration samples, whether each weight rounds
    /// down or up (needs --calibrate; not combined with --bias-correction).
    #[arg(long)]
    adaround: bool,
    /// Adam steps per layer for --adaround (default 2000, or the configuration's `adaround:` settings).
    #[arg(long)]
    adaround_iterations: Option<usize>,
    /// Automatic mixed precision: choose each layer's weight bits (from --bits) under this average number of bits
    /// per weight (4: the size of uniform 4-bit weights), from each layer's sensitivity on the calibration batches
    /// (needs --calibrate). Writes mixed_precision.yaml (the configuration with the chosen overrides, which
    /// summary.json then names) and mixed_precision.csv (the sensitivities).
    #[arg(long, value_name = "AVERAGE_BITS")]
    mixed_precision: Option<f64>,
    /// With --mixed-precision: what the budget limits, the packed weights' size or the bit operations per sample
    /// (BOPs: MACs × weight bits × activation bits).
    #[arg(long, value_enum, default_value = "size", requires = "mixed_precision")]
    budget_kind: BudgetKindArg,
    /// Mixed precision with a budget in bytes of packed weights.
    #[arg(long, conflicts_with_all = ["mixed_precision", "budget_bops"])]
    budget_bytes: Option<f64>,
    /// Mixed precision with a budget in bit operations per sample.
    #[arg(long, conflicts_with = "mixed_precision")]
    budget_bops: Option<f64>,
    /// Candidate weight bit widths for mixed precision.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    bits: Vec<u32>,
    /// How mixed precision measures a layer's sensitivity on the calibration batches: the growth of the outputs'
    /// error against the float model, or the drop of top-1 accuracy against the labels.
    #[arg(long, value_enum, default_value = "output-mse")]
    sensitivity: SensitivityArg,
    /// Output folder: summary.json, quantization_stats.yaml, quantized.safetensors.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum BudgetKindArg {
    /// Bytes of packed weights.
    Size,
    /// Bit operations per sample.
    Bops,
}

#[derive(Clone, Copy, ValueEnum)]
enum SensitivityArg {
    /// Growth of the outputs' mean squared error against the float model.
    OutputMse,
    /// Drop of top-1 accuracy against the labels.
    Top1,
}

#[derive(Clone, Copy, ValueEnum)]
enum BiasCorrectionArg {
    Empirical,
    Analytical,
}

#[derive(Clone, Copy, ValueEnum)]
enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

#[derive(clap::Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Checkpoint: distill's .safetensors, a bare state dict, or PyTorch's/Distiller's .pth / .pth.tar.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Which split to evaluate.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    split: Split,
    /// Mini-batch size.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Output folder: summary.json (top1, top5, loss, samples) and per_class.csv.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write each sample's label, prediction, next four classes and confidence to this CSV file.
    #[arg(long)]
    predictions: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// The checkpoint to convert.
    input: PathBuf,
    /// The distill checkpoint to write (.safetensors).
    output: PathBuf,
    /// Architecture, for a file that does not name its own (a plain state dict).
    #[arg(long)]
    arch: Option<String>,
    /// Dataset, for a file that does not name its own.
    #[arg(long)]
    dataset: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum SummaryKind {
    Sparsity,
    Compute,
    Modules,
    Masks,
}

#[derive(Clone, Copy, ValueEnum)]
enum TableFormat {
    Table,
    Csv,
    Json,
}

#[derive(clap::Args)]
struct SummaryArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Checkpoint to summarize (a freshly initialized model otherwise).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// What to summarize.
    #[arg(long, value_enum)]
    what: SummaryKind,
    /// Output format.
    #[arg(long, value_enum, default_value_t = TableFormat::Table)]
    format: TableFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum ThinKind {
    /// Zero filters (output channels).
    Filters,
    /// Zero input channels.
    Channels,
    /// Filters, then channels (Distiller's contract_model).
    Contract,
}

#[derive(clap::Args)]
struct ThinArgs {
    /// Architecture of the checkpoint.
    #[arg(long)]
    arch: String,
    /// Dataset of the checkpoint.
    #[arg(long)]
    dataset: String,
    /// Checkpoint to thin.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Where to write the thinned checkpoint.
    #[arg(long)]
    out: PathBuf,
    /// What to remove.
    #[arg(long, value_enum, default_value_t = ThinKind::Contract)]
    remove: ThinKind,
    /// Keep every thinned channel count a multiple of this.
    #[arg(long, default_value_t = 1)]
    round_to: i64,
    /// Let the first member of a coupled channel (a residual stream) decide for all, as Distiller's Leader.
    #[arg(long)]
    leader: bool,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Architecture.
    #[arg(long)]
    arch: String,
    /// Dataset.
    #[arg(long)]
    dataset: String,
    /// Checkpoint to export (thinned checkpoints export their smaller shapes); a freshly initialized model otherwise.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// The schedule a quantization-aware checkpoint was trained with: its quantizers prepare the model before the
    /// checkpoint loads, and the export writes their quantization.
    #[arg(long)]
    compress: Option<PathBuf>,
    /// Export quantized (QDQ int8): a folder written by `distill quantize` (its quantization runs again as
    /// recorded: configuration, equalization, calibration, AdaRound or bias correction), or a YAML with one
    /// PostTrainLinearQuantizer whose model_activation_stats gives the ranges.
    #[arg(long)]
    quantized: Option<PathBuf>,
    /// Folder of the dataset's files, for a --quantized folder that calibrated on a dataset not bundled (CIFAR-10,
    /// ImageNet, full MNIST).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// File format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Onnx)]
    format: ExportFormat,
    /// How quantized adds round: once (the standard QDQ add, fused by onnxruntime into integer QLinearAdd) or
    /// per-input (each input rounded to the output's scale first: exactly distill's simulation).
    #[arg(long, value_enum, default_value_t = AddRoundingArg::Once)]
    add_rounding: AddRoundingArg,
    /// The file to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct DeployReportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The dense baseline's checkpoint (the first row; ratios compare against it).
    #[arg(long)]
    dense: PathBuf,
    /// A pruned checkpoint whose zeros are masked, not removed.
    #[arg(long)]
    masked: Option<PathBuf>,
    /// A thinned checkpoint (written by training with a thinning schedule, or by `distill thin`).
    #[arg(long)]
    thinned: Option<PathBuf>,
    /// A quantized variant: a `distill quantize` folder (quantizes the checkpoint it names with its calibrated
    /// ranges), or a quantizer YAML with static ranges applied to the last float variant given.
    #[arg(long)]
    quantized: Option<PathBuf>,
    /// Timed runs per batch size (the median is reported).
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Threads for both runtimes (default: libtorch's setting, usually the number of cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Run onnxruntime with its graph optimizations off.
    #[arg(long)]
    no_optimizations: bool,
    /// Output folder: the ONNX files, deploy_report.csv, deploy_report.svg.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum AddRoundingArg {
    Once,
    PerInput,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    /// ONNX, opset 13 (QDQ form when quantized).
    Onnx,
}

/// What a `--quantized` argument names: a quantizer YAML, or a `distill quantize` output folder, whose recorded
/// pipeline (the configuration, the methods added on the command line, the calibration split and batches) runs
/// again on the checkpoint it quantized, so that an export carries equalization, AdaRound's rounding and bias
/// correction as `quantize` measured them.
struct QuantizedRecipe {
    config: distill::quantization::range_linear::PostTrainConfig,
    checkpoint: Option<PathBuf>,
    /// Split, batches and batch size.
    calibration: Option<(Split, usize, usize)>,
}

impl QuantizedRecipe {
    fn read(path: &std::path::Path) -> Result<Self> {
        use distill::quantization::range_linear::PostTrainConfig;
        if !path.is_dir() {
            return Ok(QuantizedRecipe { config: PostTrainConfig::from_schedule_file(path)?, checkpoint: None, calibration: None });
        }
        let summary_path = path.join("summary.json");
        let text = std::fs::read_to_string(&summary_path).map_err(|e| distill::Error::io(&summary_path, e))?;
        let summary: serde_json::Value = serde_json::from_str(&text).map_err(|e| distill::Error::data(&summary_path, format!("not the JSON 'distill quantize' writes: {e}")))?;
        let bad = |what: &str| distill::Error::data(&summary_path, format!("{what}; is this folder the output of 'distill quantize'?"));
        let config = summary["config"].as_str().ok_or_else(|| bad("names no quantizer configuration ('config')"))?;
        let mut config = PostTrainConfig::from_schedule_file(config)?;
        let checkpoint = summary["checkpoint"].as_str().map(PathBuf::from);
        let pipeline = &summary["pipeline"];
        let calibration = &summary["calibration"];
        if pipeline.is_null() || calibration.is_null() {
            // Without calibration (or from a version that did not record the pipeline): the statistics file.
            let stats = path.join("quantization_stats.yaml");
            if stats.exists() {
                config.stats = Some(distill::quantization::stats::ActivationStats::from_yaml_file(&stats)?);
            }
            return Ok(QuantizedRecipe { config, checkpoint, calibration: None });
        }
        config.cross_layer_equalization = pipeline["cross_layer_equalization"].as_bool().ok_or_else(|| bad("pipeline.cross_layer_equalization is missing"))?;
        let bias_correction = serde_yaml::to_value(&pipeline["bias_correction"]).map_err(|e| bad(&format!("pipeline.bias_correction: {e}")))?;
        config.bias_correction = distill::quantization::bias_correction::BiasCorrection::from_yaml(&bias_correction)?;
        let adaround = serde_yaml::to_value(&pipeline["adaround"]).map_err(|e| bad(&format!("pipeline.adaround: {e}")))?;
        config.adaround = distill::quantization::adaround::AdaRound::from_yaml(&adaround)?;
        let split = Split::from_str(calibration["split"].as_str().unwrap_or_default(), false).map_err(|_| bad("calibration.split is not train, valid or test"))?;
        let count = |key: &str| calibration[key].as_u64().map(|n| n as usize).ok_or_else(|| bad(&format!("calibration.{key} is missing")));
        Ok(QuantizedRecipe { config, checkpoint, calibration: Some((split, count("batches")?, count("batch_size")?)) })
    }

    /// Quantizes `model` as recorded; `data` gives the calibration split.
    fn apply(&self, model: &mut distill::nn::Model, data: impl FnOnce(Split) -> Result<distill::data::Dataset>) -> Result<distill::quantization::post_train::PostTrainReport> {
        use distill::quantization::post_train::Calibration;
        let quantizer = distill::quantization::range_linear::PostTrainLinearQuantizer::new(self.config.clone());
        match self.calibration {
            Some((split, batches, batch_size)) => {
                let set = data(split)?;
                quantizer.quantize(model, Some(&Calibration::new(&set, batches, batch_size)))
            }
            None => quantizer.quantize(model, None),
        }
    }
}

/// The settings `distill quantize` ran, for [`QuantizedRecipe`].
fn pipeline_json(config: &distill::quantization::range_linear::PostTrainConfig) -> serde_json::Value {
    let adaround = config.adaround.as_ref().map(|a| {
        serde_json::json!({
            "samples": a.samples, "iterations": a.iterations, "batch_size": a.batch_size, "reg_weight": a.reg_weight,
            "beta": [a.beta.0, a.beta.1], "warm_start": a.warm_start, "learning_rate": a.learning_rate, "seed": a.seed,
        })
    });
    serde_json::json!({ "cross_layer_equalization": config.cross_layer_equalization, "bias_correction": config.bias_correction.map(|b| b.name()), "adaround": adaround })
}

fn deploy_report(args: DeployReportArgs) -> Result<()> {
    use distill::export::deploy::{deploy_report, DeployOptions};
    let data = args.model.data()?;
    let load = |path: &PathBuf| -> Result<distill::nn::Model> {
        let mut model = args.model.model()?;
        distill::train::Checkpoint::load(path)?.restore_model(&mut model, path)?;
        Ok(model)
    };
    let mut variants = vec![("dense".to_string(), load(&args.dense)?)];
    let mut last_float = &args.dense;
    for (label, path) in [("masked", &args.masked), ("thinned", &args.thinned)] {
        if let Some(p) = path {
            variants.push((label.to_string(), load(p)?));
            last_float = p;
        }
    }
    if let Some(q) = &args.quantized {
        let recipe = QuantizedRecipe::read(q)?;
        let mut model = load(recipe.checkpoint.as_ref().unwrap_or(last_float))?;
        recipe.apply(&mut model, |split| Ok(args.model.splits(&[split])?.remove(0)))?;
        variants.push(("int8".to_string(), model));
    }
    let options = DeployOptions { runs: args.runs, threads: args.threads, onnxruntime_optimizations: !args.no_optimizations, ..DeployOptions::default() };
    let report = deploy_report(&mut variants, &data.test, &args.out, &options)?;
    let frame = report.frame()?;
    print!("{}", distill::summary::tables::to_text_table(&frame)?);
    for line in report.verdicts() {
        println!("- {line}");
    }
    distill::summary::tables::write_csv(&frame, args.out.join("deploy_report.csv"))?;
    report.chart()?.save_svg(args.out.join("deploy_report.svg"))?;
    println!(
        "{} threads, onnxruntime {}{}; ONNX files, deploy_report.csv and deploy_report.svg in {}",
        report.threads,
        report.onnxruntime_version,
        if args.no_optimizations { " (optimizations off)" } else { "" },
        args.out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
struct SensitivityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Trained checkpoint.
    #[arg(long)]
    checkpoint: PathBuf,
    /// element, filter or channel.
    #[arg(long, default_value = "element")]
    group: String,
    /// Sparsity levels: start stop step (NumPy arange: stop excluded).
    #[arg(long, num_args = 3, value_names = ["START", "STOP", "STEP"], default_values_t = [0.0, 0.95, 0.05])]
    range: Vec<f64>,
    /// Parameters to analyze, comma-separated (all 2-D and 4-D weights by default).
    #[arg(long, value_delimiter = ',')]
    params: Vec<String>,
    /// Mini-batch size of the evaluations.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Output folder: sensitivity.csv, sensitivity.svg, sensitivity.png.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct LogsArgs {
    /// Run folders (each holding event files and/or metrics.csv).
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Write the table here (.csv); without it, print it.
    #[arg(long)]
    to: Option<PathBuf>,
    /// Instead of the long table, compare this tag across runs (one column per run).
    #[arg(long)]
    tag: Option<String>,
}

#[derive(Subcommand)]
enum ScheduleCommand {
    /// Validate schedule files: schema only, or also against a model's parameter names with --arch/--dataset.
    Check {
        /// Schedule files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Architecture whose parameter names the schedules must use.
        #[arg(long, requires = "dataset")]
        arch: Option<String>,
        /// Dataset of --arch.
        #[arg(long, requires = "arch")]
        dataset: Option<String>,
    },
    /// Show each epoch's active policies, target sparsities and learning rate, and warn about conflicts.
    Preview {
        /// Schedule file.
        file: PathBuf,
        /// Training epochs.
        #[arg(long)]
        epochs: usize,
        /// Initial learning rate.
        #[arg(long, default_value_t = 0.1)]
        lr: f64,
        /// Architecture (expands '*' entries and checks names).
        #[arg(long, requires = "dataset")]
        arch: Option<String>,
        /// Dataset of --arch.
        #[arg(long, requires = "arch")]
        dataset: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OptimizerKind {
    Sgd,
    Adam,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum LrScheduleKind {
    /// Anneal to 0 along a cosine over the run.
    Cosine,
    /// Keep the learning rate (or leave it to the --compress schedule).
    Constant,
}

#[derive(clap::Args)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Total epochs (a resumed run continues up to this number).
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Initial learning rate [default: the model's, see `distill models` and the README's training defaults].
    #[arg(long)]
    lr: Option<f64>,
    /// Mini-batch size [default: the model's].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    optimizer: OptimizerKind,
    /// SGD momentum [default: the model's].
    #[arg(long)]
    momentum: Option<f64>,
    /// L2 weight decay [default: the model's].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Learning-rate schedule when the --compress schedule has none [default: the model's].
    #[arg(long, value_enum)]
    lr_schedule: Option<LrScheduleKind>,
    /// Seed of initialization, shuffling and dropout.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output folder for checkpoint.safetensors, best.safetensors, metrics.csv and summary.json.
    #[arg(long)]
    out: PathBuf,
    /// Continue from a checkpoint written by an earlier run.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Compression schedule (Distiller YAML): pruners, regularizers, quantizers and LR schedules.
    #[arg(long)]
    compress: Option<PathBuf>,
    /// Start from the weights of this checkpoint (fresh optimizer, epoch 0): fine-tuning, e.g. for
    /// quantization-aware training of a trained model (Distiller's --exp-load-weights-from).
    #[arg(long, conflicts_with = "resume")]
    load_weights: Option<PathBuf>,
    /// Lay convolution weights and inputs out channels-last (NHWC): libtorch's CPU convolutions skip a reorder at
    /// every call (a ResNet-20 step ran 20–24% faster); results agree to float rounding (see distill::nn::layout).
    #[arg(long)]
    channels_last: bool,
    /// Progress display: auto, bar, lines or quiet.
    #[arg(long, default_value = "auto")]
    progress: String,
    /// Train data-parallel in N local processes (c10d's Gloo on CPU), each on its share of every mini-batch of
    /// --batch-size samples. Under torchrun (which sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) leave it out.
    #[arg(long, default_value_t = 1)]
    nproc: usize,
    /// With data-parallel training: batch norms normalize over the samples of every rank (PyTorch's SyncBatchNorm)
    /// instead of each rank's own share.
    #[arg(long)]
    sync_batch_norm: bool,
    #[command(flatten)]
    kd: KdArgs,
    #[command(flatten)]
    early_exit: EarlyExitArgs,
}

/// Early exit, with Distiller's flags (`compress_classifier.py --earlyexit_thresholds --earlyexit_lossweights`).
#[derive(clap::Args)]
struct EarlyExitArgs {
    /// Train with early exits: one threshold per exit; in validation a sample leaves at the first exit whose
    /// score (see --earlyexit-criterion) is below its threshold.
    #[arg(long = "earlyexit-thresholds", alias = "earlyexit_thresholds", num_args = 1.., requires = "earlyexit_lossweights")]
    earlyexit_thresholds: Vec<f64>,
    /// One loss weight per exit, summing to less than 1; the final classifier gets the rest.
    #[arg(long = "earlyexit-lossweights", alias = "earlyexit_lossweights", num_args = 1.., requires = "earlyexit_thresholds")]
    earlyexit_lossweights: Vec<f64>,
    /// How an exit scores a sample: ce (Distiller's: cross-entropy against the label) or entropy (of the exit's
    /// softmax, what a deployed model can use).
    #[arg(long = "earlyexit-criterion", default_value = "ce")]
    earlyexit_criterion: String,
    /// Where the exits go, NAME or NAME:POOL each (e.g. pool1:2) [default: the model's zoo exits, see the README].
    #[arg(long = "earlyexit-at", num_args = 1.., requires = "earlyexit_thresholds")]
    earlyexit_at: Vec<String>,
}

impl EarlyExitArgs {
    /// Attaches the exits (unless the model already has them, from --load-weights) and returns the settings, if
    /// --earlyexit-thresholds is given.
    fn attach(&self, model: &mut distill::nn::Model) -> Result<Option<distill::early_exit::EarlyExit>> {
        use distill::early_exit::{attach_exits, EarlyExit, ExitCriterion, ExitPoint};
        if self.earlyexit_thresholds.is_empty() {
            return Ok(None);
        }
        let arch = model.info().arch.clone();
        let points = if self.earlyexit_at.is_empty() {
            models::zoo_exits(&arch).ok_or_else(|| {
                distill::Error::invalid("--earlyexit-at", format!("{arch} has no default exit; name where the exits go, e.g. --earlyexit-at MODULE:POOL"))
            })?
        } else {
            self.earlyexit_at.iter().map(|t| ExitPoint::parse(t)).collect::<Result<Vec<_>>>()?
        };
        if model.early_exits().is_empty() {
            attach_exits(model, &points)?;
        }
        let config = EarlyExit::new(self.earlyexit_lossweights.clone(), self.earlyexit_thresholds.clone())?
            .with_criterion(ExitCriterion::parse(&self.earlyexit_criterion)?);
        config.check_model(model)?;
        Ok(Some(config))
    }
}

/// Knowledge distillation, with Distiller's flags (`compress_classifier.py --kd-*`).
#[derive(clap::Args)]
struct KdArgs {
    /// Distill from a teacher of this architecture (same dataset), loaded from --kd-resume.
    #[arg(long = "kd-teacher", requires = "kd_resume")]
    kd_teacher: Option<String>,
    /// The teacher's trained checkpoint.
    #[arg(long = "kd-resume", requires = "kd_teacher")]
    kd_resume: Option<PathBuf>,
    /// Softmax temperature of both distributions.
    #[arg(long = "kd-temperature", visible_alias = "kd-temp", default_value_t = 1.0)]
    kd_temperature: f64,
    /// Weight of the distillation loss (multiplied by the temperature squared, as Distiller).
    #[arg(long = "kd-distill-wt", visible_alias = "kd-dw", default_value_t = 0.5)]
    kd_distill_wt: f64,
    /// Weight of the student's loss against the labels.
    #[arg(long = "kd-student-wt", visible_alias = "kd-sw", default_value_t = 0.5)]
    kd_student_wt: f64,
    /// Weight of a teacher loss; must be 0 (the teacher is not trained), as in Distiller.
    #[arg(long = "kd-teacher-wt", visible_alias = "kd-tw", default_value_t = 0.0)]
    kd_teacher_wt: f64,
    /// First epoch of distillation; it lasts to the end of training.
    #[arg(long = "kd-start-epoch", default_value_t = 0)]
    kd_start_epoch: usize,
}

impl KdArgs {
    /// The distillation policy and its schedule, if --kd-teacher is given; the teacher is checked against the
    /// student before any training.
    fn policy(&self, student: &distill::nn::Model, epochs: usize) -> Result<Option<(distill::distillation::KnowledgeDistillationPolicy, distill::scheduler::PolicySchedule)>> {
        use distill::distillation::{KnowledgeDistillationPolicy, LossWeights};
        let (Some(arch), Some(path)) = (&self.kd_teacher, &self.kd_resume) else { return Ok(None) };
        let info = student.info();
        let teacher = models::create_model(arch, &info.dataset, student.device()).map_err(|e| distill::Error::invalid("--kd-teacher", e.to_string()))?;
        let weights = LossWeights { distill: self.kd_distill_wt, student: self.kd_student_wt, teacher: self.kd_teacher_wt };
        let policy = KnowledgeDistillationPolicy::from_checkpoint(teacher, path, self.kd_temperature, weights, student)?;
        if self.kd_start_epoch >= epochs {
            return Err(distill::Error::invalid("--kd-start-epoch", format!("{}: distillation would never run in {epochs} epochs", self.kd_start_epoch)));
        }
        Ok(Some((policy, distill::scheduler::PolicySchedule::range(self.kd_start_epoch, epochs, 1)?)))
    }
}

fn load_data(dataset: &str, dir: Option<&PathBuf>, limit: Option<usize>) -> Result<DataSplits> {
    match (dataset, dir) {
        ("mnist", None) => data::mnist_bundled(),
        ("mnist", Some(d)) => data::mnist_idx(d),
        ("cifar10", Some(d)) => data::cifar10(d),
        ("cifar10", None) => Err(distill::Error::invalid("--data-dir", "cifar10 needs --data-dir pointing at the CIFAR-10 batches (binary, or the Python cifar-10-batches-py)")),
        ("imagenet", Some(d)) => {
            // ImageNet's validation images (DIR/val, or DIR itself) serve as validation and test split, held in
            // memory; DIR/train, when there, is streamed through torchvision's training transform.
            let val = if d.join("val").is_dir() { d.join("val") } else { d.clone() };
            let thousand_classes = |set: &distill::data::Dataset, dir: &std::path::Path| match set.num_classes() {
                1000 => Ok(()),
                n => Err(distill::Error::data(
                    dir,
                    format!("{n} class folders: ImageNet models number their 1,000 classes by the sorted folder names, so all 1,000 folders must be there (empty ones will do)"),
                )),
            };
            let set = data::image_folder(&val, &data::ImageFolderOptions { limit, ..Default::default() })?;
            thousand_classes(&set, &val)?;
            let train = match d.join("train") {
                dir if dir.is_dir() => {
                    let train = data::image_folder_streamed(&dir, &Default::default(), Some(data::RandomResizedCrop::imagenet(224)))?;
                    thousand_classes(&train, &dir)?;
                    train
                }
                _ => set.subset("imagenet/train (no DIR/train folder)", &[])?,
            };
            Ok(DataSplits { train, valid: set.clone(), test: set })
        }
        ("imagenet", None) => Err(distill::Error::invalid("--data-dir", "imagenet needs --data-dir pointing at an image folder (DIR/val/<class>/<image>.jpg, or DIR/<class>/...)")),
        (other, _) => Err(distill::Error::unknown("dataset", other, models::DATASETS.iter().map(|(d, ..)| *d))),
    }
}

/// `--nproc N` without a launcher's variables: start N ranks of this same command and wait for them.
fn launch_ranks(nproc: usize) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| distill::Error::Distributed(format!("cannot find this program to start its ranks: {e}")))?;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let status = distill::distributed::launch::run_local(nproc, std::time::Duration::from_secs(30), |_| {
        let mut command = std::process::Command::new(&exe);
        command.args(&argv);
        command
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(distill::Error::Distributed(format!("the run of {nproc} ranks failed ({status}); the failing rank's output above says why")))
    }
}

/// The process group of a run launched by torchrun or `--nproc` (None for a plain run).
fn join_ranks(nproc: usize) -> Result<Option<std::sync::Arc<distill::distributed::ProcessGroup>>> {
    let Some(rendezvous) = distill::distributed::Rendezvous::from_env()? else { return Ok(None) };
    if nproc > 1 && nproc != rendezvous.world_size {
        return Err(distill::Error::invalid("--nproc", format!("{nproc} disagrees with WORLD_SIZE={} set by the launcher: leave --nproc out under torchrun", rendezvous.world_size)));
    }
    Ok(Some(std::sync::Arc::new(distill::distributed::ProcessGroup::new(&rendezvous)?)))
}

fn train(args: TrainArgs) -> Result<()> {
    let group = join_ranks(args.nproc)?;
    if group.is_none() && args.nproc > 1 {
        return launch_ranks(args.nproc);
    }
    if args.nproc == 0 {
        return Err(distill::Error::invalid("--nproc", "must be at least 1"));
    }
    // Rank 0 speaks for the run; the others only report their errors.
    let is_main = group.as_ref().is_none_or(|g| g.rank() == 0);
    let progress: Progress = if is_main { args.progress.parse()? } else { Progress::Quiet };
    tch::manual_seed(args.seed as i64);
    let mut model = match (&group, args.model.device.as_str()) {
        // `--device cuda` on several ranks: each rank of a machine takes its own GPU, as torchrun's LOCAL_RANK means.
        (Some(g), "cuda") => {
            let gpus = tch::Cuda::device_count() as usize;
            if g.local_rank() >= gpus {
                return Err(distill::Error::invalid("--device", format!("LOCAL_RANK={} but this machine has {gpus} GPU(s): start at most one rank per GPU", g.local_rank())));
            }
            models::create_model(&args.model.arch, &args.model.dataset, tch::Device::Cuda(g.local_rank()))?
        }
        _ => args.model.model()?,
    };
    let device = model.device();
    if let Some(path) = &args.load_weights {
        distill::train::Checkpoint::load(path)?.restore_model(&mut model, path)?;
    }
    let early_exit = args.early_exit.attach(&mut model)?;
    if args.channels_last {
        model.to_memory_format(distill::nn::MemoryFormat::ChannelsLast)?;
    }
    let data = args.model.data()?;
    let defaults = models::training_defaults(&args.model.arch, &args.model.dataset);
    let (lr, batch_size) = (args.lr.unwrap_or(defaults.lr), args.batch_size.unwrap_or(defaults.batch_size));
    let weight_decay = args.weight_decay.unwrap_or(defaults.weight_decay);
    let optimizer = match args.optimizer {
        OptimizerKind::Sgd => OptimizerConfig::sgd(args.momentum.unwrap_or(defaults.momentum), weight_decay),
        OptimizerKind::Adam => OptimizerConfig::adam(weight_decay),
    };
    let lr_schedule = args.lr_schedule.unwrap_or(if defaults.cosine_lr { LrScheduleKind::Cosine } else { LrScheduleKind::Constant });
    let config = TrainConfig {
        epochs: args.epochs,
        batch_size,
        lr,
        optimizer,
        seed: args.seed,
        out_dir: Some(args.out.clone()),
        progress,
        early_exit: early_exit.clone(),
        distributed: group.clone(),
        sync_batch_norm: args.sync_batch_norm,
    };
    if let (Some(ee), true) = (&early_exit, is_main) {
        let at: Vec<String> = model.early_exits().iter().map(|e| e.at.clone()).collect();
        println!("early exits after {at:?}: loss weights {:?}, thresholds {:?} ({:?})", ee.loss_weights, ee.thresholds, ee.criterion);
    }
    if is_main {
        println!(
            "distill: {} on {} ({} train / {} valid / {} test samples), {} parameters, {:?}{}",
            args.model.arch,
            args.model.dataset,
            data.train.len(),
            data.valid.len(),
            data.test.len(),
            model.num_parameters(),
            device,
            group.as_ref().map_or(String::new(), |g| format!(", data-parallel on {} ranks", g.world_size()))
        );
    }
    let schedule = args.compress.as_ref().map(Schedule::from_file).transpose()?;
    let has_lr_schedule = schedule.as_ref().is_some_and(|s| !s.lr_schedulers.is_empty());
    if is_main {
        println!(
            "settings: {} lr {lr} ({}), batch {batch_size}, weight decay {weight_decay}{}",
            optimizer.name(),
            match (has_lr_schedule, lr_schedule) {
                (true, _) => "scheduled by --compress",
                (false, LrScheduleKind::Cosine) => "cosine-annealed",
                (false, LrScheduleKind::Constant) => "constant",
            },
            match optimizer {
                OptimizerConfig::Sgd { momentum, .. } => format!(", momentum {momentum}"),
                OptimizerConfig::Adam { .. } => String::new(),
            }
        );
    }
    let kd = args.kd.policy(&model, args.epochs)?;
    let mut scheduler = match &schedule {
        Some(schedule) => {
            let scheduler = schedule.build(&model)?;
            if is_main {
                print!("{}", schedule.preview(args.epochs, lr, Some(&model))?);
            }
            Some(scheduler)
        }
        None => None,
    };
    if let Some((policy, epochs)) = kd {
        if is_main {
            println!("distilling from {} (T = {}) in epochs {}..{}", args.kd.kd_resume.as_ref().map_or(String::new(), |p| p.display().to_string()), policy.temperature(), epochs.starting_epoch, epochs.ending_epoch);
        }
        scheduler.get_or_insert_with(|| distill::scheduler::CompressionScheduler::new(&model)).add_policy(Box::new(policy), epochs);
    }
    if lr_schedule == LrScheduleKind::Cosine && !has_lr_schedule && args.epochs > 0 {
        let cosine = LrPolicy::new(LrSchedule::CosineAnnealingLR { t_max: args.epochs, eta_min: 0.0 })?;
        let s = scheduler.get_or_insert_with(|| distill::scheduler::CompressionScheduler::new(&model));
        s.add_policy(Box::new(cosine), distill::scheduler::PolicySchedule::range(0, args.epochs, 1)?);
    }
    let mut trainer = Trainer::new(&mut model, config)?;
    if let Some(s) = scheduler.as_mut() {
        trainer = trainer.with_scheduler(s);
    }
    if let Some(ckpt) = &args.resume {
        trainer.resume(ckpt)?;
        if is_main {
            println!("resuming from {} after epoch {}", ckpt.display(), trainer.history().len().saturating_sub(1));
        }
    }
    let summary = trainer.run(&data)?;
    drop(trainer);
    if !is_main {
        return Ok(());
    }
    if progress == Progress::Quiet {
        // Shown during the run otherwise.
        summary.warnings.iter().for_each(|w| eprintln!("warning: {w}"));
    }
    if let Some(e) = &summary.test_exits {
        println!("test set with early exits:\n{}", e.log_lines().join("\n"));
    }
    let written = write_run_reports(&mut model, &args.out, &summary)?;
    println!("summaries and charts: {}", written.join(", "));
    println!(
        "done in {:.1} s: best epoch {} (valid top1 {:.2}%), final test top1 {:.2}%, sparsity {:.2}%; results in {}",
        summary.wall_seconds,
        summary.best.epoch,
        summary.best.top1,
        summary.test.top1,
        100.0 * summary.sparsity,
        args.out.display()
    );
    Ok(())
}

fn quantize(args: QuantizeArgs) -> Result<()> {
    use distill::quantization::post_train::Calibration;
    use distill::quantization::range_linear::{PostTrainConfig, PostTrainLinearQuantizer};
    let mut model = args.model.model()?;
    distill::train::Checkpoint::load(&args.checkpoint)?.restore_model(&mut model, &args.checkpoint)?;
    let calibration_split = args.calibrate_split;
    let wanted: &[Split] = if args.calibrate > 0 { &[Split::Test, calibration_split] } else { &[Split::Test] };
    let sets = args.model.splits(wanted)?;
    let test = &sets[0];
    let mut config = PostTrainConfig::from_schedule_file(&args.config)?;
    let batch_size = args.calibration_batch_size.unwrap_or(args.batch_size);
    let calibration = sets.get(1).map(|data| Calibration::new(data, args.calibrate, batch_size));
    if let Some(c) = &calibration {
        if c.data.is_empty() {
            return Err(distill::Error::invalid("--calibrate-split", format!("the {} split of {} is empty: calibrate on another split", calibration_split.name(), args.model.dataset)));
        }
    }
    std::fs::create_dir_all(&args.out).map_err(|e| distill::Error::io(&args.out, e))?;
    let mut config_path = std::fs::canonicalize(&args.config).unwrap_or(args.config.clone());
    use distill::quantization::mixed_precision::{Budget, Measure, MixedPrecision, Resource};
    let budget = match (args.mixed_precision, args.budget_kind, args.budget_bytes, args.budget_bops) {
        (Some(bits), BudgetKindArg::Size, ..) => Some(Budget::AverageBits(bits)),
        (Some(bits), BudgetKindArg::Bops, ..) => Some(Budget::BopsOfUniform(bits)),
        (None, _, Some(bytes), _) => Some(Budget::Bytes(bytes)),
        (None, _, None, Some(bops)) => Some(Budget::Bops(bops)),
        (None, _, None, None) => None,
    };
    let mut mixed_precision = serde_json::Value::Null;
    if let Some(budget) = budget {
        let c = calibration.as_ref().ok_or_else(|| distill::Error::invalid("--mixed-precision", "measures each layer's sensitivity on calibration batches: give --calibrate N"))?;
        let started = std::time::Instant::now();
        let measure = match args.sensitivity {
            SensitivityArg::OutputMse => Measure::OutputMse,
            SensitivityArg::Top1 => Measure::Top1,
        };
        let choice = MixedPrecision { candidates: args.bits.clone(), budget, measure }.search(&model, &config, c)?;
        let written = args.out.join("mixed_precision.yaml");
        choice.write_schedule(&args.config, &written)?;
        distill::summary::tables::write_csv(&mut choice.frame()?, args.out.join("mixed_precision.csv"))?;
        let widths: Vec<String> = choice.bits.iter().map(|(l, b)| format!("{l} {b}")).collect();
        let spent = match choice.resource {
            Resource::WeightBytes => choice.weight_bytes,
            Resource::Bops => choice.bops,
        };
        println!(
            "mixed precision: {} ({:.0} of {:.0} {}; {:.0} bytes of weights, {:.4e} BOPs); on the calibration batches: output MSE {:.3e}, top-1 {:.2}% ({} {:.4} predicted); at {} bits everywhere: output MSE {:.3e}, top-1 {:.2}%; {:.1} s; configuration in {}",
            widths.join(", "),
            spent,
            choice.limit,
            choice.resource.unit(),
            choice.weight_bytes,
            choice.bops,
            choice.measured.output_mse,
            choice.measured.top1,
            choice.measure.name(),
            choice.predicted,
            args.bits.iter().max().unwrap_or(&8),
            choice.baseline.output_mse,
            choice.baseline.top1,
            started.elapsed().as_secs_f64(),
            written.display()
        );
        mixed_precision = serde_json::json!({
            "bits": choice.bits.iter().map(|(l, b)| serde_json::json!({"layer": l, "bits": b})).collect::<Vec<_>>(),
            "measure": choice.measure.name(), "budget": choice.limit, "budget_unit": choice.resource.unit(),
            "weight_bytes": choice.weight_bytes, "bops": choice.bops, "predicted": choice.predicted,
            "measured_mse": choice.measured.output_mse, "measured_top1": choice.measured.top1,
            "baseline_mse": choice.baseline.output_mse, "baseline_top1": choice.baseline.top1,
        });
        config = PostTrainConfig { stats: config.stats.clone(), ..PostTrainConfig::from_schedule_file(&written)? };
        config_path = std::fs::canonicalize(&written).unwrap_or(written);
    }
    // The command line's additions to the configuration.
    config.cross_layer_equalization |= args.equalize;
    if let Some(b) = args.bias_correction {
        config.bias_correction = Some(match b {
            BiasCorrectionArg::Empirical => distill::quantization::bias_correction::BiasCorrection::Empirical,
            BiasCorrectionArg::Analytical => distill::quantization::bias_correction::BiasCorrection::Analytical,
        });
    }
    if args.adaround && config.adaround.is_none() {
        // The command line's AdaRound fits on exactly the calibration samples.
        let samples = calibration.as_ref().map_or(0, |c| c.samples());
        config.adaround = Some(distill::quantization::adaround::AdaRound { samples, batch_size: 32.min(samples), ..Default::default() });
    }
    if let Some(iterations) = args.adaround_iterations {
        config.adaround.as_mut().ok_or_else(|| distill::Error::invalid("--adaround-iterations", "sets AdaRound's iterations: add --adaround (or `adaround:` in the configuration)"))?.iterations = iterations;
    }
    let fp32 = train::validate(&mut model, test, args.batch_size)?;
    println!("fp32:      top1 {:.2}%  top5 {:.2}%  loss {:.4}", fp32.top1, fp32.top5, fp32.loss);
    let fp32_bytes = distill::quantization::export::float_size_bytes(&model);
    let started = std::time::Instant::now();
    let report = PostTrainLinearQuantizer::new(config.clone()).quantize(&mut model, calibration.as_ref())?;
    let prepared = &report.prepared;
    for p in &report.equalized {
        println!("equalized {} → {} ({} channels): filter ranges {:.1}:1 → {:.1}:1", p.first, p.second, p.channels, p.spread_before, p.spread_after);
    }
    let equalized = serde_json::json!(report.equalized.iter().map(|p| serde_json::json!({
        "first": p.first, "second": p.second, "channels": p.channels, "spread_before": p.spread_before, "spread_after": p.spread_after,
    })).collect::<Vec<_>>());
    let mut calibration_json = serde_json::Value::Null;
    if let (Some(stats), Some(c)) = (&report.stats, &calibration) {
        let stats_path = args.out.join("quantization_stats.yaml");
        stats.to_yaml_file(&stats_path)?;
        let batches = c.batches.min(c.data.steps(c.batch_size));
        println!("calibrated on {batches} batches of {} from the {} split ({} samples); statistics in {}", c.batch_size, calibration_split.name(), report.calibration_samples, stats_path.display());
        calibration_json = serde_json::json!({ "split": calibration_split.name(), "batches": batches, "batch_size": c.batch_size, "samples": report.calibration_samples });
    }
    for (module, reason) in &prepared.kept_float {
        eprintln!("warning: {module} stays in floating point: {reason}");
    }
    let mut bias_corrections = serde_json::Value::Null;
    if let Some(kind) = config.bias_correction {
        for (layer, reason) in &report.bias_skipped {
            println!("bias correction ({}): {layer} left alone: {reason}", kind.name());
        }
        let largest = report.bias_corrections.iter().map(|(_, c)| *c).fold(0.0, f64::max);
        println!("bias correction ({}): {} layers, largest shift removed {largest:.3e}", kind.name(), report.bias_corrections.len());
        bias_corrections = serde_json::json!(report.bias_corrections.iter().map(|(layer, c)| serde_json::json!({"layer": layer, "largest_shift": c})).collect::<Vec<_>>());
    }
    let mut adaround_layers = serde_json::Value::Null;
    if let Some(settings) = &config.adaround {
        for l in &report.adaround {
            println!("adaround {}: {} of {} weights round the other way; output MSE {:.3e} → {:.3e}", l.layer, l.flipped, l.weights, l.mse_nearest, l.mse_adaround);
        }
        let seconds: f64 = report.adaround.iter().map(|l| l.seconds).sum();
        println!("adaround: {} layers in {seconds:.1} s ({} iterations each, {} samples)", report.adaround.len(), settings.iterations, settings.samples);
        adaround_layers = serde_json::json!(report.adaround.iter().map(|l| serde_json::json!({
            "layer": l.layer, "weights": l.weights, "flipped": l.flipped, "mse_nearest": l.mse_nearest, "mse_adaround": l.mse_adaround,
        })).collect::<Vec<_>>());
    }
    println!("post-training quantization took {:.1} s", started.elapsed().as_secs_f64());
    if !prepared.fused_relus.is_empty() || !prepared.clipped_stats.is_empty() {
        println!(
            "net-aware: {} ReLU(s) fused into the layer before them, {} output range(s) clipped to the activation after them",
            prepared.fused_relus.len(),
            prepared.clipped_stats.len()
        );
    }
    let quantized = train::validate(&mut model, test, args.batch_size)?;
    println!("quantized: top1 {:.2}%  top5 {:.2}%  loss {:.4}", quantized.top1, quantized.top5, quantized.loss);
    let export_path = args.out.join("quantized.safetensors");
    let exported = distill::quantization::export::export_integer_model(&model, &export_path)?;
    let integer = distill::quantization::export::evaluate_integer(&exported, &mut model, test, args.batch_size)?;
    println!(
        "integer:   top1 {:.2}%  top5 {:.2}%  loss {:.4}  ({} bytes on disk vs {} bytes of FP32 weights, {:.2}x smaller)",
        integer.top1,
        integer.top5,
        integer.loss,
        exported.file_bytes,
        fp32_bytes,
        fp32_bytes as f64 / exported.file_bytes.max(1) as f64
    );
    let summary = serde_json::json!({
        "arch": args.model.arch, "dataset": args.model.dataset, "checkpoint": args.checkpoint, "config": config_path,
        "calibration": calibration_json, "pipeline": pipeline_json(&config), "mixed_precision": mixed_precision, "equalized": equalized, "bias_correction": bias_corrections, "adaround": adaround_layers, "fp32": fp32, "quantized": quantized, "integer": integer,
        "fp32_bytes": fp32_bytes, "quantized_bytes": exported.file_bytes,
    });
    let path = args.out.join("summary.json");
    distill::io::write_atomic(&path, (serde_json::to_string_pretty(&summary).unwrap_or_default() + "\n").as_bytes())?;
    println!("results in {}", args.out.display());
    Ok(())
}

/// Writes the run's summaries and charts next to its logs; returns the file names.
fn write_run_reports(model: &mut distill::nn::Model, out: &std::path::Path, run: &distill::train::TrainSummary) -> Result<Vec<String>> {
    use distill::summary::tables;
    let sparsity = tables::weights_sparsity_summary(model)?;
    tables::write_csv(&sparsity, out.join("summary_sparsity.csv"))?;
    tables::write_csv(&tables::model_performance_summary(model, 1)?, out.join("summary_compute.csv"))?;
    let curves = distill::plot::training_curves(&[(model.info().arch.as_str(), run.history.as_slice())])?;
    curves.save_svg(out.join("training.svg"))?;
    curves.save_png(out.join("training.png"))?;
    let bars = distill::plot::sparsity_bars(&sparsity)?;
    bars.save_svg(out.join("sparsity.svg"))?;
    bars.save_png(out.join("sparsity.png"))?;
    Ok(["summary_sparsity.csv", "summary_compute.csv", "training.svg", "training.png", "sparsity.svg", "sparsity.png"]
        .iter()
        .map(|f| out.join(f).display().to_string())
        .collect())
}

fn print_table(df: &distill::polars::prelude::DataFrame, format: TableFormat) -> Result<()> {
    use distill::summary::tables;
    match format {
        TableFormat::Table => print!("{}", tables::to_text_table(df)?),
        TableFormat::Csv => print!("{}", tables::to_csv(df)?),
        TableFormat::Json => println!("{}", serde_json::to_string_pretty(&tables::to_json(df)?).unwrap_or_default()),
    }
    Ok(())
}

fn summary(args: SummaryArgs) -> Result<()> {
    use distill::summary::tables;
    let mut model = args.model.model()?;
    let ckpt = match &args.checkpoint {
        Some(path) => {
            let c = distill::train::Checkpoint::load(path)?;
            c.restore_model(&mut model, path)?;
            Some(c)
        }
        None => None,
    };
    let df = match args.what {
        SummaryKind::Sparsity => tables::weights_sparsity_summary(&model)?,
        SummaryKind::Compute => tables::model_performance_summary(&mut model, 1)?,
        SummaryKind::Modules => tables::modules_summary(&model)?,
        SummaryKind::Masks => {
            let ckpt = ckpt.ok_or_else(|| distill::Error::invalid("--what masks", "needs --checkpoint (masks are saved in checkpoints)"))?;
            let mut scheduler = distill::scheduler::CompressionScheduler::new(&model);
            scheduler.load_state(&ckpt.masks, &[], &model)?;
            tables::masks_sparsity_summary(&model, &scheduler)?
        }
    };
    print_table(&df, args.format)?;
    if matches!(args.what, SummaryKind::Compute) && matches!(args.format, TableFormat::Table) {
        let macs: i64 = df.column("MACs")?.i64()?.iter().flatten().sum();
        println!("Total MACs: {macs}");
        if !model.thinning_recipes().is_empty() {
            let mut dense = args.model.model()?;
            print_thinning_totals(&mut dense, &mut model)?;
        }
    }
    Ok(())
}

/// One line comparing a thinned model's size with the dense model's.
fn print_thinning_totals(dense: &mut distill::nn::Model, thinned: &mut distill::nn::Model) -> Result<()> {
    let df = distill::summary::tables::thinning_summary(dense, thinned)?;
    let last = df.height() - 1;
    let get = |c: &str| -> Result<i64> { Ok(distill::summary::tables::column(&df, c)?.i64()?.get(last).unwrap_or(0)) };
    let (w0, w1, m0, m1) = (get("Weights (dense)")?, get("Weights")?, get("MACs (dense)")?, get("MACs")?);
    println!(
        "thinned ({} recipe(s)): parameters {w0} -> {w1} ({:.1}% left), MACs {m0} -> {m1} ({:.1}% left, {:.2}x fewer)",
        thinned.thinning_recipes().len(),
        100.0 * w1 as f64 / w0.max(1) as f64,
        100.0 * m1 as f64 / m0.max(1) as f64,
        m0 as f64 / m1.max(1) as f64
    );
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    let mut model = models::create_model(&args.arch, &args.dataset, tch::Device::Cpu)?;
    match (&args.checkpoint, &args.compress) {
        (Some(path), Some(schedule)) => {
            let mut scheduler = Schedule::from_file(schedule)?.build(&model)?;
            distill::train::Checkpoint::load(path)?.restore_model_compressed(&mut model, &mut scheduler, path)?
        }
        (Some(path), None) => {
            let checkpoint = distill::train::Checkpoint::load(path)?;
            if let Err(e) = checkpoint.restore_model(&mut model, path) {
                if checkpoint.model.iter().any(|(n, _)| n.ends_with(".float_weight")) {
                    return Err(distill::Error::invalid("--compress", format!("{e}; the checkpoint comes from a quantization-aware run: pass the schedule it was trained with as --compress")));
                }
                return Err(e);
            }
        }
        (None, Some(_)) => return Err(distill::Error::invalid("--compress", "applies to the --checkpoint of a run trained with it; give --checkpoint too")),
        (None, None) => {}
    }
    let parameters = model.num_parameters();
    let form = match &args.quantized {
        Some(q) => {
            let recipe = QuantizedRecipe::read(q)?;
            let source = ModelArgs { arch: args.arch.clone(), dataset: args.dataset.clone(), data_dir: args.data_dir.clone(), device: "cpu".into(), data_limit: None };
            let report = recipe.apply(&mut model, |split| Ok(source.splits(&[split])?.remove(0)))?;
            format!("QDQ, {} quantized modules", report.prepared.replaced.len())
        }
        None if args.compress.is_some() => "as its schedule's quantizers trained it".to_string(),
        None => "float32".to_string(),
    };
    let ExportFormat::Onnx = args.format;
    use distill::export::onnx::{AddRounding, OnnxOptions};
    let add_rounding = match args.add_rounding {
        AddRoundingArg::Once => AddRounding::Once,
        AddRoundingArg::PerInput => AddRounding::PerInput,
    };
    let e = distill::export::onnx::export_onnx_with(&mut model, &args.out, OnnxOptions { add_rounding })?;
    println!(
        "wrote {} (ONNX opset {}, {form}): {} nodes, {} initializers, {} parameters, {} bytes",
        args.out.display(),
        distill::export::onnx::OPSET,
        e.nodes,
        e.initializers,
        parameters,
        e.file_bytes
    );
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    let mut model = args.model.model()?;
    let ckpt = distill::train::Checkpoint::load(&args.checkpoint)?;
    ckpt.restore_model(&mut model, &args.checkpoint)?;
    let split = args.split.name();
    let set = &args.model.splits(&[args.split])?[0];
    if set.is_empty() {
        return Err(distill::Error::invalid("--split", format!("the {split} split of {} is empty", args.model.dataset)));
    }
    let evaluation = train::evaluate(&mut model, set, args.batch_size)?;
    let m = &evaluation.metrics;
    println!("{} on {split} ({} samples): {m}", args.model.arch, evaluation.samples());
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).map_err(|e| distill::Error::io(out, e))?;
        let summary = serde_json::json!({
            "arch": args.model.arch, "dataset": args.model.dataset, "checkpoint": args.checkpoint, "format": ckpt.format.to_string(),
            "split": split, "samples": evaluation.samples(), "top1": m.top1, "top5": m.top5, "loss": m.loss,
        });
        distill::io::write_atomic(out.join("summary.json"), (serde_json::to_string_pretty(&summary).unwrap_or_default() + "\n").as_bytes())?;
        distill::summary::tables::write_csv(&evaluation.per_class()?, out.join("per_class.csv"))?;
    }
    if let Some(path) = &args.predictions {
        distill::summary::tables::write_csv(&evaluation.predictions(5)?, path)?;
    }
    Ok(())
}

fn convert(args: ConvertArgs) -> Result<()> {
    let ckpt = distill::train::Checkpoint::load(&args.input)?;
    let arch = args.arch.clone().or_else(|| Some(ckpt.meta.arch.clone()).filter(|a| !a.is_empty()));
    let Some(arch) = arch else {
        return Err(distill::Error::invalid("--arch", format!("{} is a {} that does not name its architecture: give --arch and --dataset", args.input.display(), ckpt.format)));
    };
    let dataset = args.dataset.clone().or_else(|| Some(ckpt.meta.dataset.clone()).filter(|d| !d.is_empty()));
    let dataset = match dataset {
        Some(d) => d,
        None => models::dataset_of(&arch).ok_or_else(|| distill::Error::unknown("architecture", &arch, models::architectures(None)))?.to_string(),
    };
    let mut model = models::create_model(&arch, &dataset, tch::Device::Cpu)?;
    ckpt.restore_model(&mut model, &args.input)?;
    let mut out = distill::train::Checkpoint::capture(&model, None, None, ckpt.meta.epoch, 0, Vec::new());
    out.masks = ckpt.masks.iter().map(|(n, t)| (distill::nn::normalize_name(n), t.shallow_clone())).collect();
    out.save(&args.output)?;
    println!(
        "{}: {} of {arch} ({dataset}), {} tensors{} -> {}",
        args.input.display(),
        ckpt.format,
        out.model.len(),
        if out.masks.is_empty() { String::new() } else { format!(" and {} masks", out.masks.len()) },
        args.output.display()
    );
    Ok(())
}

fn thin(args: ThinArgs) -> Result<()> {
    use distill::thinning::{Structure, Thinner};
    let device = tch::Device::Cpu;
    let mut model = models::create_model(&args.arch, &args.dataset, device)?;
    let ckpt = distill::train::Checkpoint::load(&args.checkpoint)?;
    ckpt.restore_model(&mut model, &args.checkpoint)?;
    let mut scheduler = distill::scheduler::CompressionScheduler::new(&model);
    scheduler.load_state(&ckpt.masks, &[], &model)?;
    // The optimizer's state shrinks with the weights, so training can go on from the thinned checkpoint.
    let mut optimizer = match &ckpt.meta.optimizer {
        Some(meta) => {
            let mut opt = distill::optim::Optimizer::for_model(&model, meta.config, 0.0)?;
            ckpt.restore_optimizer(&mut opt, &args.checkpoint)?;
            Some(opt)
        }
        None => None,
    };
    let steps = match args.remove {
        ThinKind::Filters => vec![Structure::Filters],
        ThinKind::Channels => vec![Structure::Channels],
        ThinKind::Contract => vec![Structure::Filters, Structure::Channels],
    };
    let mut thinner = Thinner::filters().round_to(args.round_to);
    if args.leader {
        thinner = thinner.leader();
    }
    for structure in steps {
        let report = Thinner { structure, ..thinner }.apply_with(&mut model, optimizer.as_mut(), Some(scheduler.masks_mut()))?;
        let what = if structure == Structure::Filters { "filters" } else { "channels" };
        if report.changes.is_empty() {
            println!("{what}: nothing to remove");
        } else {
            println!("{what}:");
            print!("{}", distill::summary::tables::to_text_table(&report.frame()?)?);
        }
        if !report.coupled_keeps.is_empty() {
            println!("{what}: {} zero channel(s) kept because a coupled layer is not zero there", report.coupled_keeps.len());
        }
        if let Some(max) = report.dropped_shifts.iter().map(|d| d.value.abs()).reduce(f64::max) {
            println!("{what}: {} removed channel(s) carried a constant (batch-norm shift or bias) up to {max:.3e}, now dropped", report.dropped_shifts.len());
        }
    }
    let mut dense = models::create_model(&args.arch, &args.dataset, device)?;
    print_thinning_totals(&mut dense, &mut model)?;
    // Policy progress stays with the original run; the thinned checkpoint has weights, masks, optimizer and history.
    let thinned = distill::train::Checkpoint::capture(&model, optimizer.as_ref(), Some(&scheduler), ckpt.meta.epoch, ckpt.meta.seed, ckpt.meta.history.clone());
    thinned.save(&args.out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

fn sensitivity(args: SensitivityArgs) -> Result<()> {
    use distill::sensitivity::{levels, SensitivityAnalysis, SensitivityGroup};
    let group: SensitivityGroup = args.group.parse()?;
    let levels = levels(args.range[0], args.range[1], args.range[2])?;
    let mut model = args.model.model()?;
    distill::train::Checkpoint::load(&args.checkpoint)?.restore_model(&mut model, &args.checkpoint)?;
    let data = args.model.data()?;
    std::fs::create_dir_all(&args.out).map_err(|e| distill::Error::io(&args.out, e))?;
    let started = std::time::Instant::now();
    let mut analysis = SensitivityAnalysis::new();
    let df = analysis.run(&mut model, &data.valid, &args.params, &levels, group, args.batch_size, false)?;
    distill::summary::tables::write_csv(&df, args.out.join("sensitivity.csv"))?;
    let fig = distill::plot::sensitivity_curves(&df)?;
    fig.save_svg(args.out.join("sensitivity.svg"))?;
    fig.save_png(args.out.join("sensitivity.png"))?;
    println!(
        "{} rows from {} evaluations on the validation set in {:.1} s; sensitivity.csv, sensitivity.svg and sensitivity.png in {}",
        df.height(),
        analysis.evaluations(),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

fn logs(args: LogsArgs) -> Result<()> {
    let (df, warnings) = distill::logging::read_runs(&args.dirs)?;
    warnings.iter().for_each(|w| eprintln!("warning: {w}"));
    let df = match &args.tag {
        Some(tag) => distill::logging::compare_runs(&df, tag)?,
        None => df,
    };
    match &args.to {
        Some(path) if path.extension().is_some_and(|e| e == "csv") => {
            distill::summary::tables::write_csv(&df, path)?;
            println!("{} rows written to {}", df.height(), path.display());
        }
        Some(path) => {
            return Err(distill::Error::invalid(
                "--to",
                format!("{}: only .csv is written (parquet would pull an HTTP client into every build through polars)", path.display()),
            ))
        }
        None => print!("{}", distill::summary::tables::to_text_table(&df)?),
    }
    Ok(())
}

/// `schedule check`: one line per file (`ok FILE`) or per problem (`FILE:LINE:COL: message`).
fn check(files: &[PathBuf], arch: Option<&str>, dataset: Option<&str>) -> Result<bool> {
    let model = match (arch, dataset) {
        (Some(a), Some(d)) => Some(models::create_model(a, d, tch::Device::Cpu)?),
        _ => None,
    };
    let mut all_ok = true;
    for file in files {
        let result = Schedule::from_file(file).and_then(|s| model.as_ref().map_or(Ok(()), |m| s.check_model(m)).map(|()| s));
        match result {
            Ok(s) => {
                println!("ok {}", file.display());
                s.warnings.iter().for_each(|w| println!("warning: {w}"));
            }
            Err(distill::Error::Schedule(problems)) => {
                all_ok = false;
                problems.iter().for_each(|p| println!("{p}"));
            }
            Err(e) => {
                all_ok = false;
                println!("{}: {e}", file.display());
            }
        }
    }
    Ok(all_ok)
}

/// The text of a panic's payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_default()
}

fn main() -> ExitCode {
    // Writing to a closed or full standard output makes `println!` panic. A closed pipe (`distill ... | head`)
    // ends the command quietly, as any Unix tool; a full device is reported as an error. Any other panic is a bug:
    // one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let text = panic_text(info.payload());
        if !text.starts_with("failed printing to stdout") {
            let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            eprintln!("error: internal error{at}: {text} (please report it)");
        }
    }));
    match std::panic::catch_unwind(run) {
        Ok(code) => code,
        Err(payload) => {
            let text = panic_text(payload.as_ref());
            match text.strip_prefix("failed printing to stdout: ") {
                Some(why) if why.contains("Broken pipe") => ExitCode::SUCCESS,
                Some(why) => {
                    eprintln!("error: cannot write to standard output: {why}");
                    ExitCode::FAILURE
                }
                None => ExitCode::from(101),
            }
        }
    }
}

fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train(args),
        Command::Schedule(ScheduleCommand::Check { files, arch, dataset }) => match check(&files, arch.as_deref(), dataset.as_deref()) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Schedule(ScheduleCommand::Preview { file, epochs, lr, arch, dataset }) => (|| {
            let schedule = Schedule::from_file(&file)?;
            let model = match (arch, dataset) {
                (Some(a), Some(d)) => Some(models::create_model(&a, &d, tch::Device::Cpu)?),
                _ => None,
            };
            print!("{}", schedule.preview(epochs, lr, model.as_ref())?);
            Ok(())
        })(),
        Command::Eval(args) => eval(args),
        Command::Convert(args) => convert(args),
        Command::Quantize(args) => quantize(args),
        Command::Summary(args) => summary(args),
        Command::Thin(args) => thin(args),
        Command::Export(args) => export(args),
        Command::DeployReport(args) => deploy_report(args),
        Command::Sensitivity(args) => sensitivity(args),
        Command::Logs(args) => logs(args),
        Command::Models => {
            for (dataset, ..) in models::DATASETS {
                println!("{dataset}: {}", models::architectures(Some(dataset)).join(", "));
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
