//! What thinning buys: resnet56_cifar with 50% of the filters of every residual block's first convolution
//! removed. Prints parameters, MACs and the measured CPU forward time per batch of 64 (eval mode, no gradients)
//! before and after (also laid out channels-last, and with every batch norm folded into its convolution, as a
//! runtime deploys it), the forward-time reduction as a fraction of the MAC reduction (goal: at least 80%), and
//! how long the thinning itself takes (goal: at most 100 ms).
//!
//! `cargo bench --bench thinning`. Run by `cargo test --all-targets` (without cargo bench's `--bench` flag) it
//! makes a short smoke run instead, so the test suite checks that it works without timing anything.
use std::time::Instant;

use distill::models::{copy_model, create_model};
use distill::quantization::bn_fold::fold_batch_norms;
use distill::nn::{MemoryFormat, Model};
use distill::summary::tables::{column, thinning_summary};
use distill::thinning::Thinner;
use tch::{Device, Kind, Tensor};

fn forward_ms(model: &Model, x: &Tensor, repeats: usize) -> f64 {
    tch::no_grad(|| {
        let _ = model.forward_t(x, false).unwrap();
        let mut times: Vec<f64> = (0..repeats)
            .map(|_| {
                let t = Instant::now();
                let _ = model.forward_t(x, false).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    })
}

/// The median over `rounds` of each (model, input)'s forward time, the four measured in turn each round so that all
/// see the same machine load.
fn interleaved_medians(runs: [(&Model, &Tensor); 4], rounds: usize, repeats: usize) -> [f64; 4] {
    let mut times: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        for (t, (model, x)) in times.iter_mut().zip(runs) {
            t.push(forward_ms(model, x, repeats));
        }
    }
    times.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    })
}

/// Zeroes the weakest half (L1) of the filters of every block's conv1, and their batch norm's scale and shift,
/// as a filter pruner with a batch-norm-aware mask would.
fn prune_half_of_first_convs(model: &Model) {
    tch::no_grad(|| {
        for (name, w) in model.named_parameters() {
            if !(name.ends_with(".conv1.weight") && name.starts_with("layer")) {
                continue;
            }
            let n = w.size()[0];
            let norms = w.abs().sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Float);
            let (_, weakest) = norms.topk(n / 2, 0, false, true);
            let bn = name.replace("conv1.weight", "bn1");
            for mut t in [w.shallow_clone(), model.parameter(&format!("{bn}.weight")).unwrap(), model.parameter(&format!("{bn}.bias")).unwrap()] {
                let _ = t.index_fill_(0, &weakest, 0.0);
            }
        }
    });
}

/// Thins `model` with `thinner` and prints its parameters, MACs and forward time against `dense`.
#[allow(clippy::too_many_arguments)]
fn compare(dense: &mut Model, model: &mut Model, thinner: Thinner, label: &str, x: &Tensor, masked_out: &Tensor, rounds: usize, repeats: usize) {
    let report = thinner.apply(model).unwrap();
    let diff = tch::no_grad(|| (model.forward_t(x, false).unwrap() - masked_out).abs().max().double_value(&[]));
    let df = thinning_summary(dense, model).unwrap();
    let last = df.height() - 1;
    let get = |c: &str| column(&df, c).unwrap().i64().unwrap().get(last).unwrap();
    let (p0, p1, m0, m1) = (get("Weights (dense)"), get("Weights"), get("MACs (dense)"), get("MACs"));
    // Both models laid out channels-last, which spares libtorch's CPU convolutions their reorders (nn::layout).
    let channels_last = |m: &Model| {
        let mut copy = copy_model(m).unwrap();
        copy.to_memory_format(MemoryFormat::ChannelsLast).unwrap();
        copy
    };
    let (dense_cl, model_cl) = (channels_last(dense), channels_last(model));
    let [t0, t1, c0, c1] = interleaved_medians([(dense, x), (model, x), (&dense_cl, x), (&model_cl, x)], rounds, repeats);
    let mac_cut = 1.0 - m1 as f64 / m0 as f64;
    let (time_cut, nhwc_cut) = (1.0 - t1 / t0, 1.0 - c1 / c0);
    let batch = x.size()[0];
    println!("{label}: {} groups thinned, max |thinned - masked| = {diff:.1e}", report.changes.len());
    println!("  parameters {p0} -> {p1} ({:.1}% left)", 100.0 * p1 as f64 / p0 as f64);
    println!("  MACs       {m0} -> {m1} ({:.1}% left)", 100.0 * m1 as f64 / m0 as f64);
    println!("  forward, batch of {batch} (median of {rounds} x {repeats} runs): {t0:.2} ms -> {t1:.2} ms ({:.1}% faster)", 100.0 * time_cut);
    println!("  forward-time reduction / MAC reduction = {:.2}  [goal >= 0.80]", time_cut / mac_cut);
    println!("  channels-last models: {c0:.2} ms -> {c1:.2} ms ({:.1}% faster; ratio to the MAC reduction {:.2})", 100.0 * nhwc_cut, nhwc_cut / mac_cut);
    // The deployment form: every batch norm folded into the convolution before it, as an inference runtime does, so
    // the residual stream's normalizations (which thinning does not shrink) cost nothing in either model.
    let mut folded = [copy_model(dense).unwrap(), copy_model(model).unwrap(), channels_last(dense), channels_last(model)];
    for m in &mut folded {
        fold_batch_norms(m).unwrap();
    }
    let diff = tch::no_grad(|| (folded[1].forward_t(x, false).unwrap() - masked_out).abs().max().double_value(&[]));
    let [f0, f1, g0, g1] = interleaved_medians([(&folded[0], x), (&folded[1], x), (&folded[2], x), (&folded[3], x)], rounds, repeats);
    let (fold_cut, fold_nhwc_cut) = (1.0 - f1 / f0, 1.0 - g1 / g0);
    println!("  batch norms folded (max |thinned - masked| = {diff:.1e}): {f0:.2} ms -> {f1:.2} ms ({:.1}% faster; ratio {:.2}); channels-last {g0:.2} ms -> {g1:.2} ms ({:.1}% faster; ratio {:.2})", 100.0 * fold_cut, fold_cut / mac_cut, 100.0 * fold_nhwc_cut, fold_nhwc_cut / mac_cut);
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("smoke run (figures are not measurements; `cargo bench --bench thinning` for those)");
    }
    let (batch, repeats, rounds) = if full { (64, 21, 5) } else { (2, 1, 1) };
    let mut dense = create_model("resnet56_cifar", "cifar10", Device::Cpu).unwrap();
    let mut model = create_model("resnet56_cifar", "cifar10", Device::Cpu).unwrap();
    model.load_state_dict(&dense.state_dict(), true).unwrap();
    prune_half_of_first_convs(&model);
    println!("resnet56_cifar with the weakest 50% of the filters of every residual block's first convolution zeroed");
    let x = Tensor::randn([batch, 3, 32, 32], (Kind::Float, Device::Cpu));
    let masked_out = tch::no_grad(|| model.forward_t(&x, false).unwrap());

    // Thinning time: a fresh copy of the pruned model each round, best of `rounds`.
    let state = model.state_dict();
    let mut thin_ms = f64::INFINITY;
    for _ in 0..rounds {
        let mut copy = create_model("resnet56_cifar", "cifar10", Device::Cpu).unwrap();
        copy.load_state_dict(&state, true).unwrap();
        let t = Instant::now();
        Thinner::filters().apply(&mut copy).unwrap();
        thin_ms = thin_ms.min(t.elapsed().as_secs_f64() * 1e3);
    }
    // oneDNN works on blocks of 16 channels with AVX-512 (8 with AVX2): rounded counts keep its fast kernels.
    for (thinner, label) in [(Thinner::filters(), "every zero filter removed"), (Thinner::filters().round_to(16), "round_to(16)")] {
        let mut thinned = create_model("resnet56_cifar", "cifar10", Device::Cpu).unwrap();
        thinned.load_state_dict(&state, true).unwrap();
        compare(&mut dense, &mut thinned, thinner, label, &x, &masked_out, rounds, repeats);
    }
    println!("thinning itself (best of {rounds}): {thin_ms:.1} ms  [goal <= 100 ms]");
}
