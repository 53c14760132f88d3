//! Seeded mutation fuzzing of the readers of user files. Schedules (Distiller's corpus): thousands of damaged
//! schedules, each read, checked against a model, previewed and built; none may panic, take more than a few
//! seconds, or grow the process without bound, and every error from the reader names its file, line and column.
//! Calibration statistics (Distiller's ResNet-18 file) and TensorBoard event files: damaged copies are read
//! without a panic, and a statistics file that reads holds only finite, ordered ranges.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use distill::config::Schedule;
use distill::models::create_model;
use tch::Device;

/// SplitMix64: a seeded generator, so a failure reproduces from its case number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("the corpus in tests/distiller-schedules") {
        let p = entry.unwrap().path();
        if p.is_dir() {
            corpus_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml") {
            out.push(p);
        }
    }
}

const EXTREMES: &[&str] = &["0", "-1", "1000000000", "18446744073709551615", "-9223372036854775808", "1e308", "-1e308", ".nan", ".inf", "0.5", "1.5", "3", "null", "[]", "{}", "''", "~"];

/// One damaged version of `text`.
fn mutate(text: &str, rng: &mut Rng) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    for _ in 0..1 + rng.below(3) {
        let i = rng.below(lines.len());
        match rng.below(12) {
            0 => {
                lines.remove(i);
                if lines.is_empty() {
                    lines.push(String::new());
                }
            }
            1 => lines.insert(i, lines[i].clone()),
            2 => {
                let j = rng.below(lines.len());
                lines.swap(i, j);
            }
            3 | 4 => {
                // A number (or the value after a colon) replaced by an extreme.
                let line = &lines[i];
                let value = EXTREMES[rng.below(EXTREMES.len())];
                lines[i] = match line.find(": ") {
                    Some(c) => format!("{}: {value}", &line[..c]),
                    None => format!("{line} {value}"),
                };
            }
            5 => {
                let depth = 1 + rng.below(400);
                lines.insert(i, format!("deep: {}{}", "[".repeat(depth), "]".repeat(depth)));
            }
            6 => {
                // A character flipped to YAML punctuation.
                let mut chars: Vec<char> = lines[i].chars().collect();
                if !chars.is_empty() {
                    let k = rng.below(chars.len());
                    chars[k] = [':', '-', '[', '{', '"', '\'', '&', '*', '!', '|', '>', '#', '\t', ' '][rng.below(14)];
                }
                lines[i] = chars.into_iter().collect();
            }
            7 => lines.truncate(1 + i),
            8 => lines.insert(i, "---".into()),
            9 => {
                // Indentation changed.
                let line = lines[i].trim_start().to_string();
                lines[i] = format!("{}{line}", " ".repeat(rng.below(12)));
            }
            10 => lines.insert(i, "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c]".into()),
            _ => {
                let key = ["ending_epoch", "starting_epoch", "frequency", "final_sparsity", "T_mult", "T_0", "epochs", "class", "instance_name", "bits_weights"][rng.below(10)];
                let value = EXTREMES[rng.below(EXTREMES.len())];
                let indent: String = lines[i].chars().take_while(|c| *c == ' ').collect();
                lines.insert(i, format!("{indent}{key}: {value}"));
            }
        }
    }
    lines.join("\n")
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn five_thousand_mutated_schedules_never_panic_hang_or_lose_their_position() {
    let mut files = Vec::new();
    corpus_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/distiller-schedules"), &mut files);
    files.sort();
    let texts: Vec<String> = files.iter().filter_map(|f| std::fs::read_to_string(f).ok()).filter(|t| t.contains(':')).collect();
    assert!(texts.len() >= 80, "corpus: {} files", texts.len());
    let models = [create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap(), create_model("lenet", "mnist", Device::Cpu).unwrap()];
    // The reader's own problems always carry a position; set the hook aside so expected panics would be counted
    // rather than printed.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng(0x5EED);
    let (cases, mut panics, mut unlocated, mut loaded, mut slowest) = (5_000, Vec::new(), Vec::new(), 0, (Duration::ZERO, 0));
    let started = Instant::now();
    for case in 0..cases {
        let text = mutate(&texts[rng.below(texts.len())], &mut rng);
        let epochs = [1, 10, 200, 100_000, 100_001][rng.below(5)];
        let model = &models[rng.below(2)];
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match Schedule::from_yaml_str(&text, "fuzz.yaml") {
            Ok(s) => {
                let _ = s.check_model(model);
                let _ = s.preview(epochs, 0.1, Some(model));
                let _ = s.build(model);
                (true, None)
            }
            Err(e) => (false, Some(e.to_string())),
        }));
        let took = t.elapsed();
        if took > slowest.0 {
            slowest = (took, case);
        }
        match outcome {
            Err(_) => panics.push(case),
            Ok((ok, err)) => {
                loaded += usize::from(ok);
                if let Some(e) = err {
                    if !e.starts_with("fuzz.yaml:") {
                        unlocated.push((case, e));
                    }
                }
            }
        }
    }
    std::panic::set_hook(previous_hook);
    let rss = peak_rss_kib().unwrap_or(0);
    println!(
        "fuzz: {cases} cases in {:.1} s, {loaded} loaded, {} refused, {} panics, {} errors without a position, slowest case {} at {:.0} ms, peak RSS {} MiB",
        started.elapsed().as_secs_f64(),
        cases - loaded,
        panics.len(),
        unlocated.len(),
        slowest.1,
        slowest.0.as_secs_f64() * 1e3,
        rss / 1024
    );
    assert!(panics.is_empty(), "cases that panicked: {panics:?}");
    assert!(unlocated.is_empty(), "errors without FILE:LINE:COL: {:?}", &unlocated[..unlocated.len().min(5)]);
    assert!(slowest.0 < Duration::from_secs(5), "case {} took {:?}", slowest.1, slowest.0);
    assert!(rss < 4 << 20, "peak memory {rss} KiB");
}

#[test]
fn damaged_statistics_and_event_files_never_panic() {
    let stats = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/distiller-schedules/examples/quantization/post_train_quant/stats/resnet18_quant_stats.yaml")).unwrap();
    let dir = distill::io::TempDir::new().unwrap();
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng(0xCA1B);
    let (mut panics, mut read, mut refused) = (Vec::new(), 0, 0);
    for case in 0..400 {
        let text = mutate(&stats, &mut rng);
        let path = dir.path().join("stats.yaml");
        std::fs::write(&path, &text).unwrap();
        match std::panic::catch_unwind(|| distill::quantization::stats::ActivationStats::from_yaml_file(&path)) {
            Err(_) => panics.push(case),
            Ok(Ok(s)) => {
                read += 1;
                for (name, m) in &s.modules {
                    for t in m.inputs.values().chain(std::iter::once(&m.output)) {
                        let r = &t.range;
                        assert!([r.min, r.max, r.avg_min, r.avg_max, r.mean, r.std, r.b].iter().all(|v| v.is_finite()) && r.min <= r.max, "case {case}: {name} {r:?}");
                    }
                }
            }
            Ok(Err(_)) => refused += 1,
        }
    }
    // Event files: bytes flipped, cut or repeated anywhere.
    let events = {
        let mut w = distill::logging::EventWriter::create(dir.path().join("run")).unwrap();
        for s in 0..50 {
            w.add_scalar("Performance/Validation/Top1", s as f64, s).unwrap();
        }
        w.path().to_path_buf()
    };
    let bytes = std::fs::read(&events).unwrap();
    for case in 0..400 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len());
            match rng.below(3) {
                0 => b[i] = rng.next() as u8,
                1 => b.truncate(i),
                _ => {
                    let chunk: Vec<u8> = b[i..(i + 16).min(b.len())].to_vec();
                    b.splice(i..i, chunk);
                }
            }
            if b.is_empty() {
                break;
            }
        }
        std::fs::write(&events, &b).unwrap();
        if std::panic::catch_unwind(|| distill::logging::read_scalars(&events)).is_err() {
            panics.push(1000 + case);
        }
    }
    std::panic::set_hook(previous_hook);
    println!("fuzz: 400 statistics files ({read} read, {refused} refused) and 400 event files, {} panics", panics.len());
    assert!(panics.is_empty(), "cases that panicked: {panics:?}");
}
